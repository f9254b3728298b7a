"""Parse one validation result of ``cross_val_results.json`` against the fedimaging metrics contract.

A result that follows the contract is an object with ``"fedimaging_metrics": 1``, ``task``,
``primary_metric``, ``metrics`` (name to ``{value, n, ci95, small_sample}``), ``n_cases``,
``n_patients``, ``status``, ``reason``, the manifest and site-config hashes, ``seed``, ``versions``
and ``note``. Anything else (no value, an empty object, plain NVFlare metrics) is kept as a failed
or missing result with a reason, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedimaging.report.load import finite_number
from fedimaging.report.model import FAILED, MISSING, OK, SMALL_SAMPLE_CASES

CONTRACT_VERSION = 1
VERSION_KEYS = ("fedimaging", "monai", "torch", "nvflare")


@dataclass
class MetricEntry:
    """One metric of one result. ``problem`` is set when the entry cannot be used."""

    value: float | None
    n: int | None
    interval: list[float] | None
    small_sample: bool
    problem: str | None = None
    interval_problem: str | None = None
    not_applicable: bool = False


@dataclass
class ValidationResult:
    """One validating site's result for one model."""

    status: str
    reason: str | None = None
    follows_contract: bool = False
    task: str | None = None
    primary_metric: str | None = None
    metrics: dict[str, MetricEntry] = field(default_factory=dict)
    n_cases: int | None = None
    n_patients: int | None = None
    manifest_sha256: str | None = None
    site_config_sha256: str | None = None
    seed: int | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    note: str | None = None
    # Differential privacy spent by the site: epsilon, delta, noise_multiplier, clip_norm, rounds.
    differential_privacy: dict | None = None


def parse_result(raw: Any) -> ValidationResult:
    """Parse a result value as NVFlare stored it under ``{validator: {model: value}}``."""
    if raw is None:
        return ValidationResult(status=MISSING, reason="no result recorded (null)")
    if not isinstance(raw, dict):
        return ValidationResult(status=FAILED, reason=f"result is a JSON {_json_type(raw)}, not a fedimaging metrics object")
    if not raw:
        return ValidationResult(status=FAILED, reason="empty result: the validation returned no metrics")
    if "fedimaging_metrics" not in raw:
        keys = ", ".join(sorted(str(key) for key in raw)[:6])
        return ValidationResult(status=FAILED, reason=f"result is not in the fedimaging metrics format (keys: {keys})")
    if raw.get("fedimaging_metrics") != CONTRACT_VERSION:
        return ValidationResult(
            status=FAILED,
            reason=f"unsupported fedimaging_metrics version {raw.get('fedimaging_metrics')!r}; "
            f"this report reads version {CONTRACT_VERSION}",
        )

    result = ValidationResult(status=OK, follows_contract=True)
    result.task = _text(raw.get("task"))
    result.primary_metric = _text(raw.get("primary_metric"))
    result.n_cases = _count(raw.get("n_cases"))
    result.n_patients = _count(raw.get("n_patients"))
    result.manifest_sha256 = _text(raw.get("manifest_sha256"))
    result.site_config_sha256 = _text(raw.get("site_config_sha256"))
    result.seed = _count(raw.get("seed"), allow_negative=True)
    result.note = _text(raw.get("note"))
    privacy = raw.get("differential_privacy")
    if isinstance(privacy, dict) and finite_number(privacy.get("epsilon")) is not None:
        result.differential_privacy = privacy
    versions = raw.get("versions") if isinstance(raw.get("versions"), dict) else {}
    result.versions = {key: _text(versions.get(key)) for key in VERSION_KEYS}

    metrics = raw.get("metrics")
    if isinstance(metrics, dict):
        result.metrics = {str(name): parse_metric_entry(entry) for name, entry in metrics.items()}

    status = raw.get("status")
    if status == "failed":
        result.status = FAILED
        result.reason = _text(raw.get("reason")) or "the site reported a failed validation without a reason"
    elif status != "ok":
        result.status = FAILED
        result.reason = f"unknown status {status!r} (expected \"ok\" or \"failed\")"
    elif not isinstance(metrics, dict):
        result.status = FAILED
        result.reason = "status is ok but the result has no metrics object"
    return result


def parse_metric_entry(entry: Any) -> MetricEntry:
    """Parse ``{value, n, ci95, small_sample}``. A value without a valid case count n is not usable."""
    if not isinstance(entry, dict):
        return MetricEntry(None, None, None, False, problem="metric entry is not an object")

    value = finite_number(entry.get("value"))
    n = _count(entry.get("n"))
    small_sample = entry.get("small_sample") is True or (n is not None and n < SMALL_SAMPLE_CASES)
    interval, interval_problem = _interval(entry.get("ci95"))
    metric = MetricEntry(value, n, interval, small_sample, interval_problem=interval_problem)

    metric.not_applicable = entry.get("not_applicable") is True and value is None
    if value is None:
        site_reason = entry.get("reason")
        metric.problem = (str(site_reason) if isinstance(site_reason, str) and site_reason
                          else f"value {entry.get('value')!r} is missing or not a finite number")
    elif n is None:
        metric.problem = f"case count n {entry.get('n')!r} is missing or not a non-negative integer"
    elif n == 0:
        metric.problem = "the metric was computed on 0 cases"
    return metric


def _interval(raw: Any) -> tuple[list[float] | None, str | None]:
    if raw is None:
        return None, None
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        low, high = finite_number(raw[0]), finite_number(raw[1])
        if low is not None and high is not None and low <= high:
            return [low, high], None
    return None, f"the reported ci95 {raw!r} is not a [low, high] pair and is not shown"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any, allow_negative: bool = False) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if allow_negative or value >= 0 else None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__
