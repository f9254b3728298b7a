"""Text forms of values, intervals and model names shared by the heatmap and the HTML page."""

from __future__ import annotations

from fedimaging.report.model import GLOBAL_BEST, GLOBAL_FINAL, GLOBAL_OTHER, LOCAL, Cell

STATUS_LABELS = {"ok": "ok", "failed": "failed", "missing": "missing", "small_sample": "n<5"}


def format_value(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def format_interval(interval: list[float] | None) -> str:
    if not interval:
        return ""
    return f"[{format_value(interval[0])}, {format_value(interval[1])}]"


def model_label(model: str, kind: str) -> str:
    """Short human name of a model row: "global final", "global best (NVFlare)", "local site-1"."""
    if kind == GLOBAL_FINAL:
        return "global final"
    if kind == GLOBAL_BEST:
        return "global best (NVFlare)"
    if kind == GLOBAL_OTHER:
        return f"global {model}"
    return f"local {model}"


def is_own_site(cell: Cell) -> bool:
    """True for a local model validated at the site that trained it."""
    return cell.model_kind == LOCAL and cell.model == cell.site
