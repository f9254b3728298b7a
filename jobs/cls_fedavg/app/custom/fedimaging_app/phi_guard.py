"""The PHI guard at a site: block any outgoing NVFlare message or log line that holds a recorded identifier.

``PHIGuardFilter`` is an NVFlare filter for every task result a site sends: it checks every string and
every dictionary key in the message (headers, metadata, metric names and values, parameter names)
against the site's identifier list (``fedimaging_app.phi_tokens``), and checks the top-level metadata
keys against ``ALLOWED_META_KEYS``. A hit raises ``PHILeakError`` naming where in the message the
identifier sat (never the value), so NVFlare fails the task at the site and sends no result.

``install_log_guard`` wraps Python's log record factory in the site's processes: a log line that holds
an identifier is replaced by a notice before any handler (file, console, or a handler streaming logs
to the server) sees it. Training curves stay at the site (TensorBoard files in the site's workspace).

Sites enforce the guard for every job through NVFlare's site privacy policy (``local/privacy.json``
in the site's startup kit) by naming ``fedimaging_app.phi_guard.PHIGuardFilter`` as a task result
filter of the scope they accept; fedimaging's jobs also list it themselves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from fedimaging_app.phi_tokens import IDENTIFIER_FILE_NAME, IdentifierList

# Top-level metadata keys fedimaging's replies and NVFlare's Client API put in a task result.
ALLOWED_META_KEYS = frozenset({
    "NUM_STEPS_CURRENT_ROUND", "initial_metrics", "secagg", "current_round", "total_rounds", "job_id",
    "site_name", "client_name", "props", "params_type", "model_type", "model_name", "submit_model_name",
    "fedimaging_metrics", "task", "primary_metric", "metrics", "n_cases", "n_patients", "status", "reason",
    "note", "manifest_sha256", "site_config_sha256", "job_config_sha256", "seed", "versions",
    "differential_privacy", "fedproxMu", "fedprox_mu", "learning_rate", "start_round", "validate_type",
    "processed_algorithm", "pt_meta", "exchange_format", "data_kind", "filter_history",
})
SKIPPED_TYPES = (int, float, bool, type(None), complex)


class PHILeakError(RuntimeError):
    """An outgoing message or log line holds a recorded identifier; it must not leave the site."""


def _is_tensor(value) -> bool:
    return hasattr(value, "detach") and hasattr(value, "dtype")


def find_identifier(value, identifiers: IdentifierList, where: str = "message", depth: int = 0) -> tuple[str, str] | None:
    """(location, kind) of the first recorded identifier inside ``value``, else None."""
    if depth > 50 or isinstance(value, SKIPPED_TYPES):
        return None
    if isinstance(value, str):
        kind = identifiers.find(value)
        return (where, kind) if kind else None
    if isinstance(value, (bytes, bytearray)):
        if len(value) <= 1 << 16:  # short byte strings may be text; long ones are serialized tensors
            kind = identifiers.find(bytes(value).decode("utf-8", errors="replace"))
            return (where, kind) if kind else None
        return None
    if isinstance(value, np.ndarray) or _is_tensor(value):
        dtype = getattr(value, "dtype", None)
        if isinstance(value, np.ndarray) and dtype is not None and dtype.kind in "USO":
            for i, item in enumerate(value.reshape(-1).tolist()):
                hit = find_identifier(item, identifiers, f"{where}[{i}]", depth + 1)
                if hit:
                    return hit
        return None  # numeric arrays carry no text
    if isinstance(value, dict):
        for key, item in value.items():
            label = f"{where}.{key}" if isinstance(key, str) else f"{where}[{key!r}]"
            key_kind = identifiers.find(key) if isinstance(key, str) else None
            if key_kind:
                return (f"{where} (a key)", key_kind)
            hit = find_identifier(item, identifiers, label, depth + 1)
            if hit:
                return hit
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            hit = find_identifier(item, identifiers, f"{where}[{i}]", depth + 1)
            if hit:
                return hit
        return None
    if hasattr(value, "__dict__"):  # DXO, FLModel and similar carriers
        return find_identifier(vars(value), identifiers, where, depth + 1)
    return find_identifier(str(value), identifiers, where, depth + 1)


def check_outgoing(message, identifiers: IdentifierList, meta: dict | None = None, what: str = "message") -> None:
    """Raise ``PHILeakError`` when ``message`` contains an identifier or ``meta`` a key off the allow-list."""
    unknown = sorted(k for k in (meta or {}) if isinstance(k, str) and not k.startswith("__")
                     and k not in ALLOWED_META_KEYS)
    if unknown:
        raise PHILeakError(f"PHI guard blocked the {what}: metadata key(s) {unknown} are not on the guard's "
                           "allow-list (fedimaging_app.phi_guard.ALLOWED_META_KEYS)")
    hit = find_identifier(message, identifiers)
    if hit:
        location, kind = hit
        raise PHILeakError(f"PHI guard blocked the {what}: the value at {location} matches a recorded {kind} "
                           "identifier of this site; nothing was sent")


# --------------------------------------------------------------------------------------------- loading
def load_site_identifiers(site_name: str) -> IdentifierList:
    """Load this site's identifier list with its pseudonym key; raises ``ValueError`` saying what to fix."""
    from fedimaging_app.config import load_site_config, locate_site_config

    return identifiers_of(load_site_config(locate_site_config(site_name)))


def identifiers_of(site) -> IdentifierList:
    """Load the identifier list of a loaded site configuration; raises ``ValueError`` saying what to fix.

    A missing list is reported before the key: the list names the key file that prepared the data,
    so without it the key the guard would look for may not be the right one.
    """
    if not (Path(site.data_dir) / IDENTIFIER_FILE_NAME).is_file():
        raise IdentifierList.missing_error(site.data_dir)
    key_file = Path(site.key_file or os.environ.get("FEDIMAGING_KEY_FILE")
                    or IdentifierList.recorded_key_file(site.data_dir) or "~/.config/fedimaging/pseudonym.key")
    key_file = key_file.expanduser()
    try:
        key = bytes.fromhex(key_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ValueError(f"PHI guard: cannot read the site's pseudonym key {key_file} ({exc}); set key_file in the "
                         "site configuration to the key fedimaging prepare used") from exc
    return IdentifierList.load(site.data_dir, key)


# ----------------------------------------------------------------------------------------------- logs
_WITHHELD = "[log line withheld by the PHI guard: it held a recorded identifier ({kind})]"
_installed: dict = {}


def install_log_guard(identifiers: IdentifierList) -> None:
    """Replace every later log record that contains an identifier with a notice (whole process)."""
    _installed["identifiers"] = identifiers
    if _installed.get("factory"):
        return
    previous = logging.getLogRecordFactory()

    def guarded(*args, **kwargs):
        record = previous(*args, **kwargs)
        current = _installed.get("identifiers")
        if current is None:
            return record
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += "\n" + str(record.exc_info[1])
        except Exception:  # a malformed record is left to logging's own error handling
            return record
        kind = current.find(text)
        if kind:
            record.msg, record.args, record.exc_info, record.exc_text = _WITHHELD.format(kind=kind), None, None, None
        return record

    logging.setLogRecordFactory(guarded)
    _installed["factory"] = guarded


# --------------------------------------------------------------------------------------- NVFlare filter
try:
    from nvflare.apis.filter import Filter as _NVFlareFilter
except ImportError:  # lets the scanning functions be used where NVFlare is not installed
    _NVFlareFilter = object


class PHIGuardFilter(_NVFlareFilter):
    """NVFlare task result filter: reject a result that contains one of this site's identifiers."""

    def __init__(self):
        super().__init__()
        self._identifiers: IdentifierList | None = None

    def _load(self, fl_ctx) -> IdentifierList:
        if self._identifiers is None:
            self._identifiers = load_site_identifiers(fl_ctx.get_identity_name())
            install_log_guard(self._identifiers)
        return self._identifiers

    def process(self, shareable, fl_ctx):
        from nvflare.apis.dxo import from_shareable
        from nvflare.apis.fl_constant import FLContextKey

        identifiers = self._load(fl_ctx)
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "task")
        meta = {}
        try:
            meta = from_shareable(shareable).meta or {}
        except Exception:  # an error reply carries no DXO; its headers are still checked below
            pass
        try:
            check_outgoing(dict(shareable), identifiers, meta, what=f"result of task '{task}'")
        except PHILeakError as error:
            self.log_error(fl_ctx, str(error))
            raise
        return shareable
