"""Helpers for results downloaded from a deployment."""

from __future__ import annotations

import json
from pathlib import Path

RUN_FILE_NAME = "fedimaging_run.json"


def write_run_file(download_dir: Path, job_name: str, expected_sites: list[str], rounds: int | None = None) -> Path:
    """Write ``fedimaging_run.json`` into a downloaded job result so that the report knows every site.

    ``fedimaging report`` reads the expected sites from this file and names each site that sent no
    results. The simulator writes the same file; a deployment's download has none.
    """
    if not expected_sites or not all(isinstance(site, str) and site for site in expected_sites):
        raise ValueError(f"expected_sites must be a non-empty list of site names, got {expected_sites!r}")
    path = Path(download_dir) / RUN_FILE_NAME
    run_info = {"job_name": job_name, "expected_sites": sorted(set(expected_sites)), "rounds": rounds,
                "site_problems": {}}
    path.write_text(json.dumps(run_info, indent=2) + "\n")
    return path
