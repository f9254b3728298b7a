"""Build the NVFlare job folders in ``jobs/`` from the job specifications in ``jobs/specs/``.

Run ``python -m jobs.build`` from the repository root after changing a specification or the code in
``app_custom/``; a test fails when the committed job folders differ from a fresh build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_CUSTOM = REPO / "app_custom"
SPECS = REPO / "jobs" / "specs"
CLIENT_SCRIPTS = {"segmentation": "seg_client.py", "classification": "cls_client.py"}
JOB_CONFIG_FILE_NAME = "fedimaging_job.json"


@contextmanager
def _working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def make_recipe(name: str, spec: dict, *, num_rounds: int = 3, min_clients: int = 3):
    """Create the FedAvg recipe of one job; paths inside it are relative to ``app_custom/``.

    Must be called with ``app_custom/`` as the working directory, because NVFlare writes the training
    script path into the job as given.
    """
    sys.path.insert(0, str(APP_CUSTOM))
    from fedimaging_app.config import JobConfig
    from fedimaging_app.models import model_spec_for_job
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe.utils import add_cross_site_evaluation

    from fedimaging_app.server_aggregator import CheckedAggregator

    job = JobConfig.model_validate(spec)
    aggregator = CheckedAggregator(method=job.aggregation.method, trim_fraction=job.aggregation.trim_fraction,
                                   min_clients=job.aggregation.min_valid_replies)
    recipe = FedAvgRecipe(
        name=name,
        model=model_spec_for_job(job),
        min_clients=min_clients,
        num_rounds=num_rounds,
        train_script=CLIENT_SCRIPTS[job.task],
        train_args="",
        key_metric=("dice_mean" if job.task == "segmentation" else "balanced_accuracy"),
        aggregator=aggregator,
    )
    # NVFlare copies a folder's contents into custom/, so adding app_custom/ itself ships the
    # fedimaging_app package whole, the client scripts and the job configuration.
    recipe.add_client_file(".")
    recipe.add_server_file(".")
    add_cross_site_evaluation(recipe, submit_model_timeout=job.timeouts.submit_model_s,
                              validation_timeout=job.timeouts.validation_s)
    return recipe


def _global_models_only(config: dict) -> None:
    """Skip NVFlare's submit_model task, so cross-site evaluation never sends a site's local model to others."""
    for workflow in config["workflows"]:
        if workflow["path"].endswith("CrossSiteModelEval"):
            workflow.setdefault("args", {})["submit_model_task_name"] = ""


PHI_GUARD_FILTER = "fedimaging_app.phi_guard.PHIGuardFilter"
# Seconds an idle site waits before asking the server for its next task (NVFlare's default is 2).
# Secure aggregation runs four tasks a round, so each wait adds up.
TASK_REQUEST_INTERVAL = 0.25


def _set_task_request_interval(config: dict) -> None:
    config.setdefault("server", {})["task_request_interval"] = TASK_REQUEST_INTERVAL


# Every task a fedimaging site answers: training, cross-site evaluation, secure aggregation phases.
CLIENT_TASKS = ["train", "validate", "submit_model", "secagg_keys", "secagg_shares", "secagg_unmask"]
PRIVACY_FILTERS = {
    "percentile": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
    "svt": "nvflare.app_common.filters.svt_privacy.SVTPrivacy",
    "exclude_vars": "nvflare.app_common.filters.exclude_vars.ExcludeVars",
}


def _add_client_filters(config: dict, job) -> None:
    """PHI guard on every task result, the job's privacy filters on training results; tracking stays local.

    Percentile and SVT filters act on weight differences only (with full weights they would wreck the
    model); exclude_vars also removes the named parameters from the global model a site receives for
    training, so those layers stay local.
    """
    guard = {"path": PHI_GUARD_FILTER, "args": {}}
    privacy = []
    for spec in job.privacy_filters:
        args = dict(spec.args)
        if spec.name != "exclude_vars":
            args["data_kinds"] = ["WEIGHT_DIFF"]
        privacy.append({"path": PRIVACY_FILTERS[spec.name], "args": args})
    # NVFlare 2.9 looks filters up by exact task name ("*" matches nothing), so every task is listed.
    config["task_result_filters"] = [{"tasks": ["train"], "filters": [*privacy, guard]},
                                     {"tasks": [t for t in CLIENT_TASKS if t != "train"], "filters": [dict(guard)]}]
    if job.kept_local:
        config["task_data_filters"] = [{"tasks": ["train"], "filters": [
            {"path": PRIVACY_FILTERS["exclude_vars"], "args": {"exclude_vars": job.kept_local}}]}]
    # NVFlare's event converter would forward tracking events to the server; fedimaging keeps training
    # curves in TensorBoard files at the site instead.
    config["components"] = [c for c in config.get("components", [])
                            if not c.get("path", "").endswith("ConvertToFedEvent")]


def _use_timed_workflow(config: dict, job, *, num_rounds: int, min_clients: int) -> None:
    """Replace NVFlare's FedAvg controller with one that stops waiting for silent sites, and set the
    cross-site evaluation timeouts from the job's ``timeouts``."""
    for workflow in config["workflows"]:
        args = workflow.setdefault("args", {})
        if workflow["path"].endswith(".FedAvg"):
            workflow["path"] = "fedimaging_app.workflows.TimedFedAvg"
            args.update(num_rounds=num_rounds, num_clients=min_clients, min_clients=job.aggregation.min_valid_replies,
                        train_timeout=job.timeouts.train_s)
        elif workflow["path"].endswith("CrossSiteModelEval"):
            args.update(validation_timeout=job.timeouts.validation_s, submit_model_timeout=job.timeouts.submit_model_s)


def _use_secure_workflow(config: dict, job, *, num_rounds: int, min_clients: int) -> None:
    """Replace the FedAvg controller with fedimaging's secure-aggregation controller (same persistor)."""
    for workflow in config["workflows"]:
        if workflow["path"].endswith(".FedAvg"):
            args = {k: v for k, v in workflow.get("args", {}).items() if k not in ("aggregator", "aggregation_weights")}
            args.update(num_rounds=num_rounds, num_clients=min_clients, min_clients=job.aggregation.min_valid_replies,
                        train_timeout=job.timeouts.train_s, phase_timeout=job.secure_aggregation.phase_timeout_s)
            workflow["path"] = "fedimaging_app.secure_workflow.SecureFedAvg"
            workflow["args"] = args
            break
    else:
        raise RuntimeError("config_fed_server.json: NVFlare's export has no FedAvg workflow to replace")


def export_job(name: str, destination: Path, *, num_rounds: int = 3, min_clients: int = 3,
               spec: dict | None = None) -> Path:
    """Export job ``name`` (spec ``jobs/specs/<name>.json``) as a job folder under ``destination``.

    ``min_clients`` becomes both the number of sites the job waits for and FedAvg's ``num_clients``,
    the number of sites it samples each round; a federation of another size sets both in the job.
    """
    if spec is None:
        spec = json.loads((SPECS / f"{name}.json").read_text())
    # ---- Homomorphic encryption: NVFlare's HE recipe replaces everything below (jobs/he.py). ----
    if spec.get("homomorphic_encryption") is not None:
        from jobs.he import export_he_job

        return export_he_job(name, spec, destination, num_rounds=num_rounds, min_clients=min_clients)
    with _working_directory(APP_CUSTOM):
        recipe = make_recipe(name, spec, num_rounds=num_rounds, min_clients=min_clients)
        with tempfile.TemporaryDirectory() as scratch:
            recipe.export(scratch)
            target = destination / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(Path(scratch) / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    # The job's settings travel in its custom folder; written here rather than into app_custom/, so
    # that two exports at once never see each other's file.
    (target / "app" / "custom" / JOB_CONFIG_FILE_NAME).write_text(json.dumps(spec, indent=2) + "\n")
    sys.path.insert(0, str(APP_CUSTOM))
    from fedimaging_app.config import JobConfig

    job = JobConfig.model_validate(spec)
    # NVFlare's export is edited in memory and each configuration file written once.
    server_path = target / "app" / "config" / "config_fed_server.json"
    client_path = target / "app" / "config" / "config_fed_client.json"
    server, client = json.loads(server_path.read_text()), json.loads(client_path.read_text())
    _add_client_filters(client, job)
    _set_task_request_interval(server)
    if not job.evaluates_local_models:
        # A local model is neither masked nor differentially private: cross-validate global models only.
        _global_models_only(server)
    if job.secure_aggregation is not None:
        _use_secure_workflow(server, job, num_rounds=num_rounds, min_clients=min_clients)
    _use_timed_workflow(server, job, num_rounds=num_rounds, min_clients=min_clients)
    server_path.write_text(json.dumps(server, indent=4) + "\n")
    client_path.write_text(json.dumps(client, indent=4) + "\n")
    return destination / name


def _read_spec(path: Path) -> dict:
    """Read and validate a spec file; raises ``ValueError`` naming the file and every invalid field."""
    sys.path.insert(0, str(APP_CUSTOM))
    from fedimaging_app.config import ConfigError, load_job_config

    try:
        load_job_config(path)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="job names (default: every spec in jobs/specs)")
    parser.add_argument("--into", type=Path, default=REPO / "jobs", help="folder to write job folders into")
    parser.add_argument("--spec", type=Path, action="append", default=[],
                        help="build a job from this spec file instead of jobs/specs (repeatable); the job is named "
                             "after the file. Use with --into to keep your own jobs outside the repository")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of FedAvg in the built jobs (default 3)")
    parser.add_argument("--min-clients", type=int, default=3,
                        help="sites the jobs wait for and train each round (default 3)")
    args = parser.parse_args(argv)
    if args.spec and args.names:
        parser.error("give job names or --spec files, not both")
    if args.spec:
        sources = [(path.stem, path) for path in args.spec]
    else:
        sources = [(name, SPECS / f"{name}.json") for name in (args.names or sorted(p.stem for p in SPECS.glob("*.json")))]
    for name, path in sources:
        try:
            spec = _read_spec(path)
        except ValueError as exc:
            print(f"python -m jobs.build: error: {exc}", file=sys.stderr)
            return 1
        written = export_job(name, args.into, num_rounds=args.rounds, min_clients=args.min_clients, spec=spec)
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
