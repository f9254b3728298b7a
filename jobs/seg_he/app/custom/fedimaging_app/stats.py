"""Site-side summary statistics: metric, case count and a 95 % bootstrap interval over patients.

Per-case values never leave the site; only these summaries do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# With fewer cases the interval is omitted and the cell is flagged as a small sample.
MIN_CASES_FOR_INTERVAL = 5


def summarize(value: float | None, n_cases: int, interval: tuple[float, float] | None,
              reason: str | None = None, not_applicable: bool = False) -> dict:
    """Build one metric as sites send it; ``reason`` explains a missing ``value``."""
    small = n_cases < MIN_CASES_FOR_INTERVAL
    missing = value is None or not np.isfinite(value)
    summary = {
        "value": None if value is None or not np.isfinite(value) else float(value),
        "n": int(n_cases),
        "ci95": None if small or interval is None else [float(interval[0]), float(interval[1])],
        "small_sample": bool(small),
    }
    if missing:
        summary["reason"] = reason or "the metric is undefined on these cases"
    if not_applicable:
        # The metric does not apply at this site (for example a class it does not annotate), which is not a failure.
        summary["not_applicable"] = True
    return summary


def bootstrap_over_patients(
    patients: list[str], statistic: Callable[[np.ndarray], float], samples: int, seed: int
) -> tuple[float, float] | None:
    """Percentile 95 % interval of ``statistic`` when patients are resampled with replacement.

    ``statistic`` receives the indices of the units (cases, tiles) of the resampled patients, each
    patient's units repeated as often as the patient was drawn.
    """
    unique = sorted(set(patients))
    if len(unique) < 2:
        return None
    units_of = {p: np.flatnonzero(np.asarray(patients) == p) for p in unique}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        drawn = rng.choice(len(unique), size=len(unique), replace=True)
        indices = np.concatenate([units_of[unique[i]] for i in drawn])
        value = statistic(indices)
        if value is not None and np.isfinite(value):
            values.append(value)
    if not values:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mean_with_interval(values: np.ndarray, patients: list[str], samples: int, seed: int,
                       reason: str = "no validation case carries this class") -> dict:
    """Case-weighted mean of finite per-case values, with a patient-level bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    kept_values = values[finite]
    kept_patients = [p for p, ok in zip(patients, finite) if ok]
    if kept_values.size == 0:
        return summarize(None, 0, None, reason)
    interval = None
    if kept_values.size >= MIN_CASES_FOR_INTERVAL:
        interval = bootstrap_over_patients(kept_patients, lambda idx: float(np.mean(kept_values[idx])), samples, seed)
    return summarize(float(kept_values.mean()), kept_values.size, interval)
