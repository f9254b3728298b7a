"""Cross-site validation report of a federated run: report.json, heatmap.png and report.html.

This package runs on the server machine, so it imports only the standard library, numpy and
matplotlib: never torch, MONAI, OpenSlide or the training code.
"""

from fedimaging.report.load import ReportInputError
from fedimaging.report.model import SCHEMA_VERSION, Report
from fedimaging.report.writer import run_report_command, write_report

__all__ = ["SCHEMA_VERSION", "Report", "ReportInputError", "run_report_command", "write_report"]
