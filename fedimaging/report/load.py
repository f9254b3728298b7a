"""Find and read the inputs of the report below a RESULT folder.

RESULT is an NVFlare simulator workspace (results in ``<RESULT>/<job>/server/simulate_job/``) or the
unpacked result of a job downloaded from a deployment. Both hold exactly one
``cross_site_val/cross_val_results.json`` somewhere below RESULT. Paths kept for the report are
relative to RESULT, so the report never shows where RESULT sits on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR_NAME = "cross_site_val"
RESULTS_FILE_NAME = "cross_val_results.json"
RUN_FILE_NAME = "fedimaging_run.json"
JOB_CONFIG_PARTS = ("app_server", "custom", "fedimaging_job.json")

NEXT_STEP = (
    "run `fedimaging simulate` first, or pass the unpacked folder of a finished job downloaded "
    "from the NVFlare admin console"
)


class ReportInputError(Exception):
    """RESULT is missing, or it does not contain exactly one cross-site validation result."""


@dataclass
class InputFile:
    """A file found below RESULT: its relative path, SHA-256 of its bytes and parsed JSON."""

    relpath: str
    sha256: str
    data: Any = None
    error: str | None = None


@dataclass
class RunInfo:
    """The fields of ``fedimaging_run.json`` (written by ``fedimaging simulate``), checked for type."""

    job_name: str | None = None
    expected_sites: list[str] | None = None
    job_config_sha256: str | None = None
    rounds: int | None = None
    seed: int | None = None
    site_problems: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class ReportInputs:
    results: InputFile
    run_file: InputFile | None
    job_config: InputFile | None
    run: RunInfo


def find_inputs(result: Path) -> ReportInputs:
    """Locate and read cross_val_results.json, the run file and the job config below ``result``.

    Raises ReportInputError when ``result`` is not a folder, or contains no ``cross_site_val/cross_val_results.json``
    or several of them.
    """
    if not result.exists():
        raise ReportInputError(f"RESULT {result} not found; {NEXT_STEP}")
    if not result.is_dir():
        raise ReportInputError(f"RESULT {result} is not a folder; pass the simulator workspace or the unpacked job result")

    results_paths, run_paths, config_paths = _walk(result)
    if not results_paths:
        raise ReportInputError(
            f"no {RESULTS_DIR_NAME}/{RESULTS_FILE_NAME} found below RESULT {result}; expected an NVFlare simulator "
            f"workspace (<RESULT>/<job>/server/simulate_job/{RESULTS_DIR_NAME}/) or an unpacked job result whose "
            f"cross-site validation has finished; {NEXT_STEP}"
        )
    if len(results_paths) > 1:
        listed = ", ".join(path.relative_to(result).as_posix() for path in results_paths)
        raise ReportInputError(
            f"found {len(results_paths)} cross-site validation results below RESULT {result} ({listed}); "
            "pass the folder of one job as RESULT"
        )

    results_path = results_paths[0]
    results = _read_json(result, results_path)
    run_path = _nearest(run_paths, results_path)
    run_file = _read_json(result, run_path) if run_path else None
    config_path = _nearest(config_paths, results_path)
    job_config = _read_json(result, config_path) if config_path else None
    run = parse_run_file(run_file) if run_file else RunInfo()
    return ReportInputs(results=results, run_file=run_file, job_config=job_config, run=run)


def _walk(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    results, runs, configs = [], [], []
    # os.walk does not follow symbolic links to folders, so a link cannot make the search loop.
    for folder, _dirs, files in os.walk(root):
        here = Path(folder)
        if RESULTS_FILE_NAME in files and here.name == RESULTS_DIR_NAME:
            results.append(here / RESULTS_FILE_NAME)
        if RUN_FILE_NAME in files:
            runs.append(here / RUN_FILE_NAME)
        if JOB_CONFIG_PARTS[-1] in files and here.parts[-2:] == JOB_CONFIG_PARTS[:2]:
            configs.append(here / JOB_CONFIG_PARTS[-1])
    return sorted(results), sorted(runs), sorted(configs)


def _nearest(candidates: list[Path], anchor: Path) -> Path | None:
    """Pick the candidate that shares the longest folder prefix with ``anchor``, then the shallowest."""
    if not candidates:
        return None

    def distance(path: Path) -> tuple[int, int, str]:
        shared = 0
        for mine, theirs in zip(path.parent.parts, anchor.parent.parts):
            if mine != theirs:
                break
            shared += 1
        return (-shared, len(path.parts), path.as_posix())

    return min(candidates, key=distance)


def _hash_only(root: Path, path: Path) -> InputFile:
    relpath = path.relative_to(root).as_posix()
    try:
        return InputFile(relpath=relpath, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    except OSError as exc:
        return InputFile(relpath=relpath, sha256="", error=f"cannot read {relpath}: {exc.strerror}")


def _read_json(root: Path, path: Path) -> InputFile:
    found = _hash_only(root, path)
    if found.error:
        return found
    try:
        # NVFlare writes float NaN as the bare token NaN, which json.loads accepts.
        found.data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        found.error = f"{found.relpath} is not valid JSON: {exc}"
    return found


def parse_run_file(run_file: InputFile) -> RunInfo:
    """Read the fields of ``fedimaging_run.json``. A field of the wrong type is dropped and listed in ``problems``."""
    info = RunInfo()
    if run_file.error:
        info.problems.append(run_file.error)
        return info
    data = run_file.data
    if not isinstance(data, dict):
        info.problems.append(f"{run_file.relpath} is not a JSON object and was ignored")
        return info

    info.job_name = _typed(data, "job_name", str, info.problems)
    info.job_config_sha256 = _typed(data, "job_config_sha256", str, info.problems)
    info.rounds = _typed(data, "rounds", int, info.problems)
    info.seed = _typed(data, "seed", int, info.problems)

    sites = data.get("expected_sites")
    if isinstance(sites, list) and sites and all(isinstance(site, str) for site in sites):
        info.expected_sites = list(dict.fromkeys(sites))
    elif sites is not None:
        info.problems.append("expected_sites in fedimaging_run.json is not a non-empty list of site names and was ignored")

    problems = data.get("site_problems")
    if isinstance(problems, dict):
        info.site_problems = {str(site): str(reason) for site, reason in problems.items()}
    elif problems is not None:
        info.problems.append("site_problems in fedimaging_run.json is not an object and was ignored")
    return info


def _typed(data: dict, key: str, kind: type, problems: list[str]) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        problems.append(f"{key} in fedimaging_run.json is not a {kind.__name__} and was ignored")
        return None
    return value


def finite_number(value: Any) -> float | None:
    """Return ``value`` as a float when it is a finite JSON number (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
