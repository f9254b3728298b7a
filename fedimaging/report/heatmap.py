"""Draw the models x sites heatmap of the primary metric as a PNG (matplotlib, Agg canvas, no display)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fedimaging.report.labels import format_interval, format_value, is_own_site, model_label
from fedimaging.report.model import FAILED, NOT_APPLICABLE, SMALL_SAMPLE, Cell, Report

CELL_WIDTH_IN = 1.5
CELL_HEIGHT_IN = 1.0
FAILED_COLOUR = "#b8b8b8"
MISSING_COLOUR = "#e4e4e4"
COLOUR_MAP = "viridis"
# Site names longer than this many characters overlap at CELL_WIDTH_IN, so they are drawn slanted.
LONG_SITE_NAME = 18


def draw_heatmap(report: Report, path: Path) -> None:
    """Write the heatmap of ``report``'s primary metric to ``path`` as a PNG."""
    rows = report.models
    sites = report.site_names
    primary = report.run.primary_metric

    width = 3.2 + CELL_WIDTH_IN * max(len(sites), 1) + 1.3
    height = 1.6 + CELL_HEIGHT_IN * max(len(rows), 1)
    figure = Figure(figsize=(width, height), dpi=150, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    if sites and rows:
        _draw_grid(figure, axes, report)
    else:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no validation results", transform=axes.transAxes, ha="center", va="center", fontsize=12)

    title = f"Cross-site validation: {primary or 'no metric reported'}"
    if report.run.job_name:
        title += f" (job {report.run.job_name})"
    axes.set_title(_plain(title), fontsize=12, pad=12)
    figure.savefig(path, format="png")


def _draw_grid(figure: Figure, axes, report: Report) -> None:
    rows = report.models
    sites = report.site_names
    primary = report.run.primary_metric
    cells = {(cell.model, cell.site): cell for cell in report.cells if cell.metric == primary}

    values = np.full((len(rows), len(sites)), np.nan)
    for i, row in enumerate(rows):
        for j, site in enumerate(sites):
            cell = cells.get((row.model, site))
            if cell is not None and cell.usable:
                values[i, j] = cell.value

    image = axes.imshow(np.ma.masked_invalid(values), cmap=COLOUR_MAP, norm=_norm(values), aspect="auto")
    figure.colorbar(image, ax=axes, shrink=0.8, label=_plain(primary or "primary metric"))

    for i, row in enumerate(rows):
        for j, site in enumerate(sites):
            cell = cells.get((row.model, site))
            if cell is not None:
                _annotate(axes, i, j, cell, image)

    axes.set_xticks(range(len(sites)), labels=[_plain(site) for site in sites], fontsize=10)
    axes.xaxis.tick_top()
    if max(len(site) for site in sites) > LONG_SITE_NAME:
        axes.tick_params(axis="x", labelrotation=30)
        for label in axes.get_xticklabels():
            label.set_horizontalalignment("left")
            label.set_rotation_mode("anchor")
    axes.set_yticks(range(len(rows)), labels=[_plain(_row_label(row, report)) for row in rows], fontsize=9)
    axes.set_xticks(np.arange(-0.5, len(sites), 1), minor=True)
    axes.set_yticks(np.arange(-0.5, len(rows), 1), minor=True)
    axes.grid(which="minor", color="white", linewidth=2)
    axes.tick_params(which="both", length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.set_xlabel("validating site  ·  cell: value, n, 95% interval (n<5: no interval)  ·  dashed: own site",
                    fontsize=8)


def _plain(text: str) -> str:
    """Escape dollar signs, because matplotlib reads text between two of them as mathtext."""
    return text.replace("$", r"\$")


def _norm(values: np.ndarray) -> Normalize:
    finite = values[np.isfinite(values)]
    if finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0):
        return Normalize(vmin=0.0, vmax=1.0)
    low, high = float(finite.min()), float(finite.max())
    return Normalize(vmin=low, vmax=high if high > low else low + 1.0)


def _annotate(axes, i: int, j: int, cell: Cell, image) -> None:
    if not cell.usable:
        colour = FAILED_COLOUR if cell.status == FAILED else MISSING_COLOUR
        label = "n/a" if cell.status == NOT_APPLICABLE else cell.status
        axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=colour, edgecolor="none",
                                 hatch="//" if cell.status == FAILED else None))
        reason = textwrap.wrap(textwrap.shorten(cell.reason or "", width=44, placeholder="…"), width=22)[:2]
        axes.text(j, i - 0.2, label, ha="center", va="center", fontsize=10, fontweight="bold", color="#222222",
                  bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5})
        axes.text(j, i + 0.17, _plain("\n".join(reason)), ha="center", va="center", fontsize=7.5, color="#222222",
                  linespacing=1.2, bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0})
    else:
        red, green, blue, _alpha = image.cmap(image.norm(cell.value))
        text_colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        detail = f"n={cell.n}\n" + ("n<5: no interval" if cell.status == SMALL_SAMPLE else format_interval(cell.interval) or "no interval")
        axes.text(j, i - 0.18, format_value(cell.value), ha="center", va="center", fontsize=11, fontweight="bold",
                  color=text_colour)
        axes.text(j, i + 0.2, detail, ha="center", va="center", fontsize=8, color=text_colour, linespacing=1.2)
    if is_own_site(cell):
        axes.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="black", linestyle="--",
                                 linewidth=1.4))


def _row_label(row, report: Report) -> str:
    label = model_label(row.model, row.kind)
    if report.best_global_model.model == row.model:
        label += "  [best by rule]"
    if row.weighted_mean is None or math.isnan(row.weighted_mean):
        return f"{label}\nmean: –"
    return f"{label}\nmean {format_value(row.weighted_mean)} (n={row.n_total})"
