"""``fedimaging simulate``: run an exported job in the NVFlare simulator, each site on its own data.

The committed job folder is copied into the workspace first (NVFlare writes into submitted folders),
and the outcome is checked afterwards: the simulator exits 0 even when a job aborted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

RUN_FILE_NAME = "fedimaging_run.json"


class SimulationError(RuntimeError):
    """The simulation could not start or did not complete; the message names the logs to read."""


@dataclass
class SimulationResult:
    """Locations of the simulator's results."""

    workspace: Path
    server_dir: Path
    global_model: Path
    cross_site_results: Path


def _load_sites(site_files: list[Path]) -> dict[str, Path]:
    from fedimaging_app.config import ConfigError, load_site_config

    sites: dict[str, Path] = {}
    for path in site_files:
        try:
            config = load_site_config(path)
        except ConfigError as exc:
            raise SimulationError(str(exc)) from exc
        if config.site_name in sites:
            raise SimulationError(f"{path}: site_name '{config.site_name}' is also used by {sites[config.site_name]}; "
                                  "every simulated site needs its own name")
        if not (config.data_dir / "datalist.json").is_file():
            raise SimulationError(f"{path}: data_dir {config.data_dir} holds no datalist.json; "
                                  "run 'fedimaging prepare' for this site first")
        sites[config.site_name] = path.resolve()
    return sites


def _set_rounds(job_dir: Path, rounds: int) -> None:
    """Set the number of FedAvg rounds in a copy of the job.

    NVFlare's exporter omits ``num_rounds`` when it equals FedAvg's default (5), so the FedAvg
    workflow gets the argument even when the job folder does not show it.
    """
    config_path = job_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(config_path.read_text())
    changed = False
    for workflow in config.get("workflows", []):
        args = workflow.setdefault("args", {})
        if "num_rounds" in args or workflow.get("path", "").endswith(".FedAvg"):
            args["num_rounds"] = rounds
            changed = True
    if not changed:
        raise SimulationError(f"{config_path}: no FedAvg workflow, so --rounds cannot be applied")
    config_path.write_text(json.dumps(config, indent=4))


def _train_every_site(job_dir: Path, n_sites: int) -> None:
    """Make every simulated site train in every round.

    NVFlare's FedAvg samples ``num_clients`` sites at random each round, so a job built for fewer
    sites than are simulated would leave a random site out of each round.
    """
    config_path = job_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(config_path.read_text())
    for workflow in config.get("workflows", []):
        # The exporter omits num_clients when it equals FedAvg's default (3), so set it explicitly.
        if workflow.get("path", "").endswith(".FedAvg") or "num_clients" in workflow.get("args", {}):
            workflow.setdefault("args", {})["num_clients"] = n_sites
    config_path.write_text(json.dumps(config, indent=4))
    meta_path = job_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["min_clients"] = n_sites
    meta_path.write_text(json.dumps(meta, indent=4))


def _refuse_homomorphic_encryption(job: Path) -> None:
    """HE jobs need the TenSEAL contexts that provisioning with the HE builder puts into startup kits."""
    job_config = job / "app" / "custom" / "fedimaging_job.json"
    try:
        uses_he = json.loads(job_config.read_text()).get("homomorphic_encryption") is not None
    except (OSError, json.JSONDecodeError, AttributeError):
        uses_he = False
    if uses_he:
        raise SimulationError(f"{job}: this job uses homomorphic_encryption, which runs on deployments only: the "
                              "simulator has no TenSEAL contexts (NVFlare's HE recipe refuses it). Provision with "
                              "'fedimaging provision --he' and submit the job (docs/homomorphic_encryption.md), or "
                              "simulate the same spec without homomorphic_encryption")


def _check_job_config(job: Path) -> None:
    """Reject an invalid job configuration here, before the simulator starts and buries the reason in its log."""
    from fedimaging_app.config import JOB_CONFIG_FILE_NAME, ConfigError, load_job_config

    job_config = job / "app" / "custom" / JOB_CONFIG_FILE_NAME
    if not job_config.is_file():
        return  # a plain NVFlare job without fedimaging's client code
    try:
        load_job_config(job_config)
    except ConfigError as exc:
        raise SimulationError(f"{exc}. Fix the job's spec and build the job again (python -m jobs.build)") from exc


def check_outcome(workspace: Path) -> SimulationResult:
    """Raise ``SimulationError`` unless the final global model and cross-site results exist."""
    server_dirs = list(workspace.glob("**/server/simulate_job"))
    if not server_dirs:
        raise SimulationError(f"{workspace}: no server/simulate_job folder; the simulator did not start the job "
                              "(see the simulator output above)")
    server_dir = server_dirs[0]
    model = next(iter(server_dir.glob("app_server/FL_global_model.pt")), None)
    results = server_dir / "cross_site_val" / "cross_val_results.json"
    problems = []
    if model is None:
        problems.append("no final global model (app_server/FL_global_model.pt)")
    if not results.is_file():
        problems.append("no cross-site validation results (cross_site_val/cross_val_results.json)")
    if problems:
        logs = sorted(str(p.relative_to(workspace)) for p in workspace.glob("**/log.txt"))
        raise SimulationError(f"the job did not complete: {'; '.join(problems)}. Read the logs: {', '.join(logs)}")
    blocked = _phi_guard_blocks(workspace)
    if blocked:
        raise SimulationError(
            "the job ran, but the PHI guard blocked results at "
            + "; ".join(f"{site} ({count} log lines; first: {line})" for site, (count, line) in sorted(blocked.items()))
            + ". Those results never reached the server, so the global model and the report leave them out. "
            "Remove the identifier from what the job's code sends, then run the job again")
    return SimulationResult(workspace, server_dir, model, results)


PHI_BLOCK_MARK = "PHI guard blocked"


def _phi_guard_blocks(workspace: Path) -> dict[str, tuple[int, str]]:
    """Sites whose logs record a message the PHI guard blocked: the count and the first log message."""
    blocked: dict[str, tuple[int, str]] = {}
    for log in sorted(workspace.glob("sim/*/log.txt")) + sorted(workspace.glob("sim/*/*/log.txt")):
        site = log.relative_to(workspace / "sim").parts[0]
        if site == "server":
            continue
        for line in log.read_text(errors="replace").splitlines():
            if PHI_BLOCK_MARK in line:
                count, first = blocked.get(site, (0, line[line.index(PHI_BLOCK_MARK):].strip()))
                blocked[site] = (count + 1, first)
    return blocked


def simulate(job: Path, site_files: list[Path], workspace: Path, rounds: int | None = None,
             threads: int | None = None, timeout_s: float | None = None, log_name: str | None = None) -> SimulationResult:
    """Run ``job`` (an exported job folder) with one simulated client per site configuration.

    With ``log_name`` the simulator's output goes to that file in ``workspace`` instead of the terminal.
    """
    job = job.resolve()
    if not (job / "meta.json").is_file():
        raise SimulationError(f"{job}: not an NVFlare job folder (no meta.json); pass a folder from jobs/")
    _refuse_homomorphic_encryption(job)
    _check_job_config(job)
    sites = _load_sites(site_files)
    workspace = workspace.resolve()
    if workspace.exists() and any(workspace.iterdir()):
        raise SimulationError(f"--workspace {workspace} is not empty; use a new folder for each run")
    workspace.mkdir(parents=True, exist_ok=True)
    job_copy = workspace / "job" / job.name
    shutil.copytree(job, job_copy)
    if rounds is not None:
        _set_rounds(job_copy, rounds)
    _train_every_site(job_copy, len(sites))
    site_map = workspace / "site_configs.json"
    site_map.write_text(json.dumps({name: str(path) for name, path in sites.items()}, indent=2))

    from fedimaging_app.config import JOB_CONFIG_FILE_NAME, SITE_CONFIG_MAP_ENV, file_sha256

    job_config = job_copy / "app" / "custom" / JOB_CONFIG_FILE_NAME
    run_info = {
        "job_name": job.name,
        "expected_sites": sorted(sites),
        "job_config_sha256": file_sha256(job_config) if job_config.is_file() else None,
        "rounds": rounds,
        "seed": json.loads(job_config.read_text()).get("seed") if job_config.is_file() else None,
        "site_problems": {},
    }
    (workspace / RUN_FILE_NAME).write_text(json.dumps(run_info, indent=2))

    environment = dict(os.environ)
    environment[SITE_CONFIG_MAP_ENV] = str(site_map)
    # Each simulated site is a process of its own; one math thread each keeps 2-core machines responsive.
    environment.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "nvflare.cli", "simulator", str(job_copy), "-w", str(workspace / "sim"),
               "-c", ",".join(sorted(sites)), "-t", str(threads or len(sites))]
    logger.info("running %s", " ".join(command))
    try:
        if log_name:
            with open(workspace / log_name, "w") as log:
                completed = subprocess.run(command, env=environment, timeout=timeout_s, check=False,
                                           stdout=log, stderr=subprocess.STDOUT)
        else:
            completed = subprocess.run(command, env=environment, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SimulationError(f"the simulator did not finish within {timeout_s:.0f} s") from exc
    if completed.returncode != 0:
        where = f"; see {workspace / log_name}" if log_name else ""
        raise SimulationError(f"the simulator exited with status {completed.returncode}{where}")
    return check_outcome(workspace)
