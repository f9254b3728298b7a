"""``fedimaging site check``: the readiness checks a site runs before it joins a federation.

Each check returns a result with a message and, when it fails, what to do. The checks read only
local files, except the last one, which opens one TCP connection to the server named in the kit.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

CONNECT_TIMEOUT_S = 3.0
KIT_FILES = ("fed_client.json", "client.crt", "client.key", "rootCA.pem")


@dataclass
class CheckResult:
    """Outcome of one readiness check; ``fix`` says what to do when it failed."""

    name: str
    ok: bool
    message: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"PASS {self.name}: {self.message}"
        return f"FAIL {self.name}: {self.message}\n     what to do: {self.fix}"


def _failed(name: str, message: str, fix: str) -> CheckResult:
    return CheckResult(name, False, message, fix)


def check_data(data_dir: Path) -> CheckResult:
    """Check that the prepared folder exists and that its datalist agrees with its manifest."""
    name = "prepared data"
    prepare_hint = f"run 'fedimaging prepare dicom|wsi SOURCE --out {data_dir}' at this site, or fix data_dir"
    files = {}
    for part in ("datalist.json", "manifest.json"):
        path = data_dir / part
        try:
            files[part] = json.loads(path.read_text())
        except FileNotFoundError:
            return _failed(name, f"{path} not found", prepare_hint)
        except (OSError, json.JSONDecodeError) as exc:
            return _failed(name, f"{path} cannot be read ({exc})", prepare_hint)
    datalist, manifest = files["datalist.json"], files["manifest.json"]
    items = list(datalist.get("training", [])) + list(datalist.get("validation", []))
    if not datalist.get("training"):
        return _failed(name, f"{data_dir / 'datalist.json'} lists no training item", prepare_hint)
    known = {case.get("case_id") for case in manifest.get("cases", [])}
    known |= {slide.get("slide_id") for slide in manifest.get("slides", [])}
    problems = []
    for item in items:
        unit = item.get("case_id") or item.get("slide_id")
        if unit is not None and unit not in known:
            problems.append(f"{unit} is in the datalist but not in the manifest")
        for key in ("image", "label"):
            value = item.get(key)
            if isinstance(value, str) and not (data_dir / value).exists():
                problems.append(f"{key} file {value} is missing")
        if len(problems) >= 5:
            break
    if problems:
        return _failed(name, f"{data_dir}: " + "; ".join(problems),
                       "the folder was changed after preparation; " + prepare_hint + " again")
    return CheckResult(name, True, f"{data_dir}: {len(datalist.get('training', []))} training and "
                                   f"{len(datalist.get('validation', []))} validation items, all files present")


def _job_config_path(job: Path) -> Path | None:
    if job.is_file():
        return job
    candidates = sorted(job.glob("app*/custom/fedimaging_job.json"))
    return candidates[0] if candidates else None


def _class_available(source, cases: list[dict], local_classes: set[str]) -> bool:
    if source.label_value is not None:
        wanted = {source.label_value} if isinstance(source.label_value, int) else set(source.label_value)
        return any(wanted & set(case.get("label_values") or []) for case in cases)
    if source.mask is not None:
        return any(source.mask in (case.get("masks") or []) for case in cases)
    if source.segment is not None:
        return any(source.segment in (case.get("segment_names") or []) for case in cases)
    if source.local_classes is not None:
        return bool(set(source.local_classes) & local_classes)
    return True  # all_other_classes: whatever is left


def check_phi_identifiers(site) -> CheckResult:
    """Check that the PHI guard can load the site's identifier list with the site's pseudonym key."""
    from fedimaging_app.phi_guard import identifiers_of

    name = "PHI identifier list"
    try:
        identifiers = identifiers_of(site)
    except ValueError as exc:
        return _failed(name, str(exc), "without the list every job refuses to train at this site; prepare the "
                                       "data again, or point key_file at the key that fedimaging prepare used")
    return CheckResult(name, True, f"{site.data_dir}: {len(identifiers)} identifier digests, readable with the "
                                   "site's key")


def check_job(job: Path | None) -> CheckResult:
    """Check that the job folder contains a valid fedimaging job configuration."""
    from fedimaging_app.config import ConfigError, load_job_config

    name = "job configuration"
    if job is None:
        return CheckResult(name, True, "not checked; pass --job JOB to check it")
    config_path = _job_config_path(job)
    if config_path is None:
        return _failed(name, f"{job}: no app*/custom/fedimaging_job.json",
                       "pass a job folder from jobs/ (or the job the lead researcher will submit)")
    try:
        load_job_config(config_path)
    except ConfigError as exc:
        return _failed(name, str(exc), "ask the lead researcher for a job built from a valid spec")
    return CheckResult(name, True, f"{config_path}: valid")


def check_label_mapping(site, job: Path | None) -> CheckResult:
    """Check that every required class of the job is mapped, and found in the prepared data."""
    from fedimaging_app.config import ConfigError, load_job_config

    name = "label mapping"
    if job is None:
        return CheckResult(name, True, "not checked against a job; pass --job JOB to check it")
    config_path = _job_config_path(job)
    try:
        job_config = load_job_config(config_path) if config_path is not None else None
    except ConfigError:
        job_config = None
    if job_config is None:
        return _failed(name, "not checked, because the job configuration is missing or invalid",
                       "see the job configuration check")
    mapping = site.label_mapping
    missing = [cls for cls, need in job_config.classes.items() if need == "required" and cls not in mapping]
    unknown = sorted(set(mapping) - set(job_config.classes))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"required classes without a source: {', '.join(missing)}")
        if unknown:
            parts.append(f"mapped classes the job does not have: {', '.join(unknown)}")
        return _failed(name, "; ".join(parts),
                       f"edit label_mapping in the site configuration; the job's classes are {dict(job_config.classes)}")
    try:
        manifest = json.loads((site.data_dir / "manifest.json").read_text())
        datalist = json.loads((site.data_dir / "datalist.json").read_text())
    except (OSError, json.JSONDecodeError):
        return _failed(name, f"{site.data_dir}: manifest.json or datalist.json cannot be read",
                       "fix the prepared data first (see the prepared data check)")
    cases = manifest.get("cases", [])
    local_classes = set(datalist.get("classes") or [])
    absent = [cls for cls, source in mapping.items()
              if job_config.classes.get(cls) == "required" and not _class_available(source, cases, local_classes)]
    if absent:
        return _failed(name, f"required classes mapped to sources absent from the prepared data: {', '.join(absent)}",
                       "check the label values, mask, segment or class names in label_mapping against "
                       f"{site.data_dir / 'manifest.json'}")
    required = [cls for cls, need in job_config.classes.items() if need == "required"]
    unmapped_optional = [cls for cls, need in job_config.classes.items() if need == "optional" and cls not in mapping]
    message = (f"required classes of {config_path.parent.parent.parent.name} mapped and found in the prepared data: "
               f"{', '.join(required)}")
    if unmapped_optional:
        message += f"; optional classes not annotated at this site: {', '.join(unmapped_optional)}"
    return CheckResult(name, True, message)


def check_device(preference: str) -> CheckResult:
    name = "device"
    if preference == "cpu":
        return CheckResult(name, True, "cpu (as configured)")
    import torch

    if torch.cuda.is_available():
        return CheckResult(name, True, f"cuda: {torch.cuda.get_device_name(0)}")
    if preference == "cuda":
        return _failed(name, "device: cuda is configured but PyTorch sees no CUDA device",
                       "install the NVIDIA driver and a CUDA build of PyTorch, or set device: auto or cpu")
    return CheckResult(name, True, "auto: no CUDA device, training will run on the CPU")


def _verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise InvalidSignature or ValueError unless ``issuer`` signed ``cert``."""
    if cert.issuer != issuer.subject:
        raise ValueError(f"issuer '{cert.issuer.rfc4514_string()}' is not the root CA "
                         f"'{issuer.subject.rfc4514_string()}'")
    key = issuer.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    else:
        raise ValueError(f"unsupported root CA key type {type(key).__name__}")


def _validity_problem(label: str, cert: x509.Certificate, now: datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"{label} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if now > cert.not_valid_after_utc:
        return f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def check_startup_kit(kit: Path | None, site_name: str, now: datetime | None = None) -> CheckResult:
    """Check the kit's files, that its certificate chains to its rootCA.pem, is in date and names this site."""
    name = "startup kit"
    ask = "ask the project admin for this site's startup kit and set startup_kit in the site configuration"
    if kit is None:
        return _failed(name, "startup_kit is not set in the site configuration", ask)
    startup = kit / "startup"
    absent = [part for part in KIT_FILES if not (startup / part).is_file()]
    if absent:
        return _failed(name, f"{startup}: missing {', '.join(absent)}", ask)
    now = now or datetime.now(timezone.utc)
    try:
        root = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes())
        cert = x509.load_pem_x509_certificate((startup / "client.crt").read_bytes())
        key = serialization.load_pem_private_key((startup / "client.key").read_bytes(), password=None)
    except ValueError as exc:
        return _failed(name, f"{startup}: a certificate or key cannot be read ({exc})", ask)
    try:
        _verify_issued_by(cert, root)
    except (InvalidSignature, ValueError) as exc:
        detail = exc if str(exc) else "signature does not verify"
        return _failed(name, f"{startup / 'client.crt'} was not issued by {startup / 'rootCA.pem'} ({detail})",
                       "the kit mixes files of two provisionings; " + ask)
    for label, item in (("client.crt", cert), ("rootCA.pem", root)):
        problem = _validity_problem(label, item, now)
        if problem:
            return _failed(name, f"{startup}: {problem}", "ask the project admin to provision a new kit for this site")
    public_numbers = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if public_numbers != cert.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo):
        return _failed(name, f"{startup / 'client.key'} does not belong to {startup / 'client.crt'}", ask)
    common_names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if site_name not in common_names:
        return _failed(name, f"{startup / 'client.crt'} is issued to {', '.join(common_names) or 'nobody'}, "
                             f"not to site_name '{site_name}'",
                       "use this site's own kit, or set site_name to the client name of the kit")
    days = (cert.not_valid_after_utc - now).days
    return CheckResult(name, True, f"{kit}: certificate for {site_name} issued by the kit's root CA, "
                                   f"valid for {days} more days")


def check_server(kit: Path | None, timeout_s: float = CONNECT_TIMEOUT_S) -> CheckResult:
    """Resolve the server named in ``startup/fed_client.json`` and open one TCP connection to it."""
    name = "server"
    if kit is None or not (kit / "startup" / "fed_client.json").is_file():
        return _failed(name, "no startup/fed_client.json to read the server address from", "fix the startup kit first")
    from fedimaging.deploy.kits import server_address

    try:
        host, port = server_address(kit)
    except (KeyError, IndexError, ValueError, json.JSONDecodeError) as exc:
        return _failed(name, f"{kit / 'startup' / 'fed_client.json'}: no server target ({exc})",
                       "ask the project admin for a new kit")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return _failed(name, f"server host name '{host}' does not resolve ({exc.strerror})",
                       f"ask your network team to make '{host}' resolvable from this machine (DNS or hosts file)")
    family, kind, protocol, _, address = addresses[0]
    try:
        with socket.socket(family, kind, protocol) as connection:
            connection.settimeout(timeout_s)
            connection.connect(address)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        return _failed(name, f"cannot connect to {host}:{port} ({address[0]}): {reason}",
                       f"check that the server is running and that the firewall allows outgoing TCP to port {port}")
    return CheckResult(name, True, f"{host}:{port} resolves to {address[0]} and accepts connections")


def run_checks(config_path: Path, job: Path | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> list[CheckResult]:
    """Run every readiness check of the site configured in ``config_path``."""
    from fedimaging_app.config import ConfigError, load_site_config

    try:
        site = load_site_config(config_path)
    except ConfigError as exc:
        return [_failed("site configuration", str(exc), "fix the file; site_configs/README.md lists the fields")]
    results = [CheckResult("site configuration", True, f"{config_path}: site {site.site_name}")]
    results.append(check_data(site.data_dir))
    results.append(check_phi_identifiers(site))
    results.append(check_job(job))
    results.append(check_label_mapping(site, job))
    results.append(check_device(site.device))
    results.append(check_startup_kit(site.startup_kit, site.site_name))
    results.append(check_server(site.startup_kit, connect_timeout_s))
    return results
