"""Write report.json, heatmap.png and report.html, and the ``fedimaging report`` command behaviour."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from fedimaging.report.assemble import build_report
from fedimaging.report.heatmap import draw_heatmap
from fedimaging.report.load import ReportInputError, find_inputs
from fedimaging.report.model import Report
from fedimaging.report.page import render_page

logger = logging.getLogger(__name__)

JSON_NAME = "report.json"
HEATMAP_NAME = "heatmap.png"
HTML_NAME = "report.html"


def write_report(result: Path, out: Path, generated_at: datetime | None = None) -> Report:
    """Build the report of the run below ``result`` and write its three files into ``out``.

    Raises ReportInputError when ``result`` is missing or contains no single cross-site validation
    result, and OSError when ``out`` cannot be written.
    """
    inputs = find_inputs(result)
    logger.info("reading %s below %s", inputs.results.relpath, result)
    report = build_report(inputs, generated_at)

    out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: the report stores null, never NaN, so any JSON reader can load it.
    text = json.dumps(report.to_dict(), indent=2, allow_nan=False, ensure_ascii=False)
    (out / JSON_NAME).write_text(text + "\n", encoding="utf-8")
    heatmap_path = out / HEATMAP_NAME
    draw_heatmap(report, heatmap_path)
    (out / HTML_NAME).write_text(render_page(report, heatmap_path.read_bytes()), encoding="utf-8")
    return report


def run_report_command(result: Path, out: Path) -> int:
    """Run ``fedimaging report RESULT --out OUT`` and return its exit status (0, 1 or 2)."""
    try:
        report = write_report(result, out)
    except ReportInputError as exc:
        print(f"fedimaging report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedimaging report: error: cannot write the report into {out}: {exc}", file=sys.stderr)
        return 2

    best = report.best_global_model.model or "none"
    print(f"{report.usable_cell_count} of {len(report.cells)} cells usable; best global model by the report's rule: {best}")
    print(f"report: {out / HTML_NAME} (data: {out / JSON_NAME}, heatmap: {out / HEATMAP_NAME})")
    if report.usable_cell_count == 0:
        print("fedimaging report: error: the results hold no usable cell; the report lists the failed and missing "
              "validations with their reasons", file=sys.stderr)
        return 1
    return 0
