"""Keyed-hash (HMAC-SHA256) pseudonyms for cases and patients.

The key lives in a site-local file outside the prepared folder, so IDs are stable across runs at
one site but cannot be linked back to UIDs by anyone without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

DEFAULT_KEY_FILE = Path("~/.config/fedimaging/pseudonym.key")
KEY_FILE_ENV = "FEDIMAGING_KEY_FILE"


class KeyFileError(ValueError):
    """The pseudonym key file is unusable."""


def default_key_file() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE).expanduser()


def load_or_create_key(key_file: Path, out_dir: Path) -> bytes:
    """Read the site key, creating a random 256-bit key (mode 0600) on first use.

    Raises ``KeyFileError`` when the key file would sit inside ``out_dir``, which may be shared.
    """
    key_file = key_file.expanduser().resolve()
    out_dir = out_dir.expanduser().resolve()
    if key_file == out_dir or out_dir in key_file.parents:
        raise KeyFileError(
            f"key file {key_file} is inside the output folder {out_dir}; keep it outside, "
            f"for example with --key-file {DEFAULT_KEY_FILE}"
        )
    if key_file.exists():
        try:
            key = bytes.fromhex(key_file.read_text(encoding="ascii").strip())
        except OSError as exc:
            raise KeyFileError(f"key file {key_file} cannot be read ({exc.strerror or exc}); check its permissions, "
                               "or pass the right file with --key-file") from exc
        except ValueError as exc:  # also UnicodeDecodeError: a binary file is not a hex key
            raise KeyFileError(f"key file {key_file} does not contain a hex key (fedimaging writes the key as one "
                               "line of hexadecimal digits); restore it from backup") from exc
        if len(key) < 16:
            raise KeyFileError(f"key file {key_file} holds a key shorter than 128 bits; restore it from backup")
        return key
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


class Pseudonymizer:
    """Derives prefixed pseudonymous IDs from identifiers with one site key."""

    def __init__(self, key: bytes):
        self._key = key

    def digest(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    def case_id(self, series_identity: str) -> str:
        return "case-" + self.digest("series", series_identity)[:16]

    def patient_id(self, patient_identity: str) -> str:
        return "patient-" + self.digest("patient", patient_identity)[:16]
