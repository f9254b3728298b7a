"""Server-side checks of site replies and robust aggregation (numpy only: no torch, no training code).

Every reply is checked before it is aggregated: its keys and shapes equal the global model's (a
``module.`` prefix from DataParallel is stripped), all values are finite, and its weight (number of
training cases) is positive. An invalid reply is excluded with the site and reason; the round fails
when fewer than ``min_clients`` valid replies remain or when the total weight is 0. Replies are summed
in site-name order in float64, so the aggregate does not depend on arrival order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DATA_PARALLEL_PREFIX = "module."
Method = Literal["weighted_mean", "median", "trimmed_mean"]


class AggregationError(RuntimeError):
    """The round cannot produce a global model; the message names the sites and reasons."""


@dataclass
class Reply:
    """One site's update: parameters by name and its aggregation weight (training cases)."""

    site: str
    params: dict[str, np.ndarray]
    weight: float


@dataclass
class Verdict:
    """The outcome of checking one reply."""

    site: str
    accepted: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0


def _index_text(index: tuple) -> str:
    return "[" + ",".join(str(i) for i in index) + "]"


def _non_finite(name: str, values: np.ndarray, limit: int = 3) -> list[str]:
    bad = np.argwhere(~np.isfinite(values))
    found = []
    for index in bad[:limit]:
        value = values[tuple(index)]
        text = "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        found.append(f"{name}{_index_text(tuple(index))}={text}")
    if len(bad) > limit:
        found.append(f"{name}: {len(bad) - limit} more non-finite values")
    return found


def check_reply(reply: Reply, reference_shapes: dict[str, tuple[int, ...]], max_update_norm: float | None = None,
                reference: dict[str, np.ndarray] | None = None) -> Verdict:
    """Check one reply against the global model's keys and shapes; never raises for bad content."""
    verdict = Verdict(reply.site, accepted=False, weight=float(reply.weight))
    params = {name: np.asarray(value) for name, value in reply.params.items()}
    if params and all(name.startswith(DATA_PARALLEL_PREFIX) for name in params) and not any(
            name.startswith(DATA_PARALLEL_PREFIX) for name in reference_shapes):
        params = {name[len(DATA_PARALLEL_PREFIX):]: value for name, value in params.items()}
        verdict.notes.append(f"stripped the '{DATA_PARALLEL_PREFIX}' prefix (DataParallel/DDP) from every key")
    missing = sorted(set(reference_shapes) - set(params))
    extra = sorted(set(params) - set(reference_shapes))
    if missing:
        verdict.reasons.append(f"missing keys: {', '.join(missing)}")
    if extra:
        verdict.reasons.append(f"unexpected keys: {', '.join(extra)}")
    for name in sorted(set(params) & set(reference_shapes)):
        if tuple(params[name].shape) != tuple(reference_shapes[name]):
            verdict.reasons.append(f"{name}: shape {tuple(params[name].shape)}, expected {tuple(reference_shapes[name])}")
        elif np.issubdtype(params[name].dtype, np.number):
            verdict.reasons.extend(_non_finite(name, params[name]))
    if not math.isfinite(verdict.weight) or verdict.weight < 0:
        verdict.reasons.append(f"invalid weight {reply.weight!r}")
    elif verdict.weight == 0:
        verdict.reasons.append("0 examples")
    if not verdict.reasons and max_update_norm is not None and reference is not None:
        norm = update_norm(params, reference)
        if norm > max_update_norm:
            verdict.notes.append(f"update norm {norm:.4g} clipped to {max_update_norm:.4g}")
            params = clip_update(params, reference, max_update_norm)
    verdict.accepted = not verdict.reasons
    verdict.params = params if verdict.accepted else {}
    return verdict


def update_norm(params: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of the update (params minus the global model) over all floating-point tensors."""
    total = 0.0
    for name, value in params.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            difference = np.asarray(value, dtype=np.float64) - np.asarray(reference[name], dtype=np.float64)
            total += float(np.sum(difference * difference))
    return math.sqrt(total)


def clip_update(params: dict[str, np.ndarray], reference: dict[str, np.ndarray], max_norm: float) -> dict:
    """Scale the update so that its L2 norm is at most ``max_norm``."""
    norm = update_norm(params, reference)
    if norm <= max_norm or norm == 0:
        return params
    scale = max_norm / norm
    clipped = {}
    for name, value in params.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            base = np.asarray(reference[name], dtype=np.float64)
            clipped[name] = (base + (value.astype(np.float64) - base) * scale).astype(value.dtype)
        else:
            clipped[name] = value
    return clipped


def _combine(stack: np.ndarray, weights: np.ndarray, method: Method, trim_fraction: float) -> np.ndarray:
    if method == "weighted_mean":
        return np.tensordot(weights / weights.sum(), stack, axes=1)
    if method == "median":
        return np.median(stack, axis=0)
    trim = int(math.floor(trim_fraction * stack.shape[0]))
    ordered = np.sort(stack, axis=0)
    return ordered[trim:stack.shape[0] - trim].mean(axis=0)


def aggregate(replies: list[Reply], reference_shapes: dict[str, tuple[int, ...]], *, method: Method = "weighted_mean",
              trim_fraction: float = 0.1, min_clients: int = 1, max_update_norm: float | None = None,
              reference: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], list[Verdict]]:
    """Check every reply and combine the valid ones; raise ``AggregationError`` when the round cannot.

    ``median`` and ``trimmed_mean`` (coordinate-wise, ``trim_fraction`` of the replies cut at each end)
    ignore the weights, as robust estimators do; ``weighted_mean`` is FedAvg.
    """
    verdicts = [check_reply(r, reference_shapes, max_update_norm, reference) for r in sorted(replies, key=lambda r: r.site)]
    accepted = [v for v in verdicts if v.accepted]
    rejected = [v for v in verdicts if not v.accepted]
    if replies and all(v.weight == 0 for v in verdicts):
        raise AggregationError(
            "total aggregation weight is 0 - no site trained on any sample this round (sites: "
            + ", ".join(v.site for v in verdicts) + "); check the sites' prepared data")
    if len(accepted) < min_clients:
        detail = "; ".join(f"{v.site}: {', '.join(v.reasons)}" for v in rejected) or "no replies"
        raise AggregationError(
            f"only {len(accepted)} valid replies, fewer than min_clients={min_clients} ({detail})")
    weights = np.array([v.weight for v in accepted], dtype=np.float64)
    combined = {}
    for name, shape in reference_shapes.items():
        stack = np.stack([np.asarray(v.params[name], dtype=np.float64) for v in accepted])
        dtype = np.asarray(accepted[0].params[name]).dtype
        combined[name] = _combine(stack, weights, method, trim_fraction).reshape(shape).astype(
            dtype if np.issubdtype(dtype, np.floating) else np.float64)
    return combined, verdicts
