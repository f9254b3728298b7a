"""Build a job that uses NVFlare's homomorphic encryption (spec key ``"homomorphic_encryption": {}``).

``jobs/build.py`` hands such specs to ``export_he_job``. The job is NVFlare's HE recipe
(``FedAvgRecipeWithHE``): sites encrypt their weights with the TenSEAL context of their startup kit
(``client_context.tenseal``), the server adds the ciphertexts with ``HEInTimeAccumulateWeightedAggregator``
and stores the global model encrypted. fedimaging then adds what all its jobs have: the PHI guard on
every result (before the encryption, so it reads plain values), the job's timeouts, and the short
task request interval. HE jobs have no cross-site evaluation: NVFlare offers none with HE, and only a
site can decrypt the global model (``fedimaging he-decrypt``, which also writes an evaluation job).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HE_ENCRYPTOR = "nvflare.app_opt.he.model_encryptor.HEModelEncryptor"
SCATTER_AND_GATHER = "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather"
KEY_METRICS = {"segmentation": "dice_mean", "classification": "balanced_accuracy"}


def make_he_recipe(name: str, job, *, num_rounds: int, min_clients: int):
    """NVFlare's HE recipe for a validated ``JobConfig``; call it with ``app_custom/`` as working directory."""
    from fedimaging_app.models import model_spec_for_job
    from nvflare.app_opt.pt.recipes.fedavg_he import FedAvgRecipeWithHE

    from jobs.build import CLIENT_SCRIPTS

    recipe = FedAvgRecipeWithHE(
        name=name,
        model=model_spec_for_job(job),
        min_clients=min_clients,
        num_rounds=num_rounds,
        train_script=CLIENT_SCRIPTS[job.task],
        train_args="",
    )
    recipe.add_client_file(".")
    recipe.add_server_file(".")
    return recipe


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=4) + "\n")


def _filters_with_path(config: dict, key: str, suffix: str) -> list[dict]:
    return [f for entry in config.get(key, []) for f in entry.get("filters", []) if f.get("path", "").endswith(suffix)]


def _finish_client_config(job_dir: Path, job) -> None:
    """PHI guard on every task result, then HE encryption of training results; HE decryption of task data stays."""
    from jobs.build import _add_client_filters

    path = job_dir / "app" / "config" / "config_fed_client.json"
    config = _read(path)
    encryptors = [f for entry in config.get("task_result_filters", []) if "train" in entry.get("tasks", [])
                  for f in entry.get("filters", []) if f.get("path") == HE_ENCRYPTOR]
    if len(encryptors) != 1:
        raise RuntimeError(f"{path}: expected one HEModelEncryptor on the train task from NVFlare's HE recipe, "
                           f"found {len(encryptors)}")
    _add_client_filters(config, job)
    for entry in config.get("task_data_filters", []):
        entry["tasks"] = sorted(entry["tasks"])  # NVFlare's exporter writes them in varying order
    for entry in config["task_result_filters"]:
        if "train" in entry["tasks"]:
            # The guard reads plain values; after the encryptor the weights are ciphertexts.
            entry["filters"].append(encryptors[0])
    _write(path, config)


def _finish_server_config(job_dir: Path, job, *, num_rounds: int, min_clients: int) -> None:
    from jobs.build import _set_task_request_interval

    path = job_dir / "app" / "config" / "config_fed_server.json"
    config = _read(path)
    controllers = [w for w in config["workflows"] if w.get("path") == SCATTER_AND_GATHER]
    if len(controllers) != 1:
        raise RuntimeError(f"{path}: expected NVFlare's ScatterAndGather workflow from the HE recipe")
    # Every site must answer: the encrypted sum cannot be checked, so a round needs all its sites.
    controllers[0].setdefault("args", {}).update(num_rounds=num_rounds, min_clients=min_clients,
                                                 train_timeout=job.timeouts.train_s)
    for component in config["components"]:
        if component.get("path", "").endswith("IntimeModelSelector"):
            # The best model is chosen on the metric the sites report for the received global model.
            component.setdefault("args", {})["key_metric"] = KEY_METRICS[job.task]
    _set_task_request_interval(config)
    _write(path, config)


def export_he_job(name: str, spec: dict, destination: Path, *, num_rounds: int, min_clients: int) -> Path:
    """Write the HE job ``name`` from ``spec`` under ``destination`` and return its folder."""
    from jobs.build import APP_CUSTOM, JOB_CONFIG_FILE_NAME, _working_directory

    sys.path.insert(0, str(APP_CUSTOM))
    from fedimaging_app.config import JobConfig

    job = JobConfig.model_validate(spec)
    if job.homomorphic_encryption is None:
        raise ValueError(f"job {name}: the spec has no homomorphic_encryption block; build it with jobs.build")
    target = destination / name
    with _working_directory(APP_CUSTOM):
        recipe = make_he_recipe(name, job, num_rounds=num_rounds, min_clients=min_clients)
        with tempfile.TemporaryDirectory() as scratch:
            recipe.export(scratch)
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(Path(scratch) / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    # Written into the exported job, not app_custom/, so that concurrent exports cannot collide.
    (target / "app" / "custom" / JOB_CONFIG_FILE_NAME).write_text(json.dumps(spec, indent=2) + "\n")
    _finish_client_config(target, job)
    _finish_server_config(target, job, num_rounds=num_rounds, min_clients=min_clients)
    return target
