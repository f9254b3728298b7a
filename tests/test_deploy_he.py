"""Homomorphic encryption on a real deployment on loopback: provisioned HE kits, server and three sites.

The lead researcher submits a one-round HE job (a 39k-parameter UNet) through the FLARE API. The
server's global model must be ciphertext only. A site decrypts it with its kit, and the evaluation job
that the decryption writes scores it at every site. The report and the MONAI bundle are built from
that job's result. Every process is stopped in teardown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from fedimaging.deploy.kits import LocalDeployment, wait_for_port
from fedimaging.deploy.provision import provision
from jobs.build import REPO, SPECS, export_job
from tests.test_deploy_e2e import (
    LEAD,
    SITES,
    free_port,
    install_site_config,
    kit_environment,
    open_session,
    report_for,
    run_job_as_lead,
    wait_for_clients,
)

NO_TENSEAL = "tenseal is not installed: pip install -e '.[he]' to run the HE tests"

JOB = "seg_he"
# The HE variant of the demo segmentation job (a spec gets "homomorphic_encryption": {}).
BASE_SPEC = "demo_seg"


@pytest.fixture(scope="module")
def he_sites(tmp_path_factory) -> dict[str, dict]:
    """Small demo CT data for three sites, each with its own pseudonym key."""
    from fedimaging.demo.radiology import generate_radiology_site
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

    root = tmp_path_factory.mktemp("he_data")
    sites = {}
    for index, site in enumerate(SITES):
        raw = root / site / "raw"
        generate_radiology_site(raw, site_index=index, n_cases=1, seed=index, image_size=48, n_slices=16)
        key = root / f"{site}.key"
        prepare_dicom(PrepareOptions(source=raw / "dicom", labels=raw / "labels", out=root / site / "prepared",
                                     site=site, key_file=key))
        sites[site] = {"data": root / site / "prepared", "key": key}
    return sites


def small_he_job(destination: Path) -> tuple[Path, dict]:
    """The seg_he job with a 39k-parameter UNet, one round, two steps, and a known initial model."""
    base_spec = json.loads((SPECS / f"{BASE_SPEC}.json").read_text())
    spec = dict(base_spec, homomorphic_encryption={}, model={"name": "unet", "channels": [4, 8, 16, 32]},
                steps_per_round=2, patch_size=[32, 32, 16], samples_per_volume=1, bootstrap_samples=100)
    job = export_job(JOB, destination, num_rounds=1, min_clients=len(SITES), spec=spec)

    from fedimaging_app.config import JobConfig
    from fedimaging_app.models import build_model

    torch.manual_seed(1234)
    initial = build_model(JobConfig.model_validate(spec)).state_dict()
    torch.save(initial, job / "app" / "custom" / "initial_model.pt")
    server_path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    for component in server["components"]:
        if component["id"] == "persistor":
            component["args"]["source_ckpt_file_full_name"] = "initial_model.pt"
    server_path.write_text(json.dumps(server, indent=2))
    return job, initial


def he_spec(**changes) -> dict:
    return dict(json.loads((SPECS / f"{BASE_SPEC}.json").read_text()), homomorphic_encryption={}, **changes)


@pytest.mark.parametrize("changes, reason", [
    ({"secure_aggregation": {}}, "secure_aggregation"),
    ({"aggregation": {"method": "median"}}, "median"),
    ({"aggregation": {"method": "trimmed_mean"}}, "trimmed_mean"),
    ({"privacy_filters": [{"name": "percentile", "args": {}}]}, "privacy_filters"),
    ({"cross_site_models": "global"}, "cross-site"),
])
def test_refused_combinations(changes, reason):
    from fedimaging_app.config import JobConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=reason):
        JobConfig.model_validate(he_spec(**changes))


def test_differential_privacy_allowed_and_no_local_models():
    from fedimaging_app.config import JobConfig

    job = JobConfig.model_validate(he_spec(differential_privacy={"noise_multiplier": 1.0, "clip_norm": 1.0}))
    assert job.homomorphic_encryption is not None and not job.evaluates_local_models


def test_simulator_refuses_he_job(tmp_path):
    from fedimaging.simulate import SimulationError, simulate

    job = tmp_path / "seg_he"
    (job / "app" / "custom").mkdir(parents=True)
    (job / "meta.json").write_text("{}")
    (job / "app" / "custom" / "fedimaging_job.json").write_text(json.dumps(he_spec()))
    with pytest.raises(SimulationError, match="deployments only.*fedimaging provision --he"):
        simulate(job, [tmp_path / "site-1.yaml"], tmp_path / "workspace")
    assert not (tmp_path / "workspace").exists()


def test_he_job_build(tmp_path):
    pytest.importorskip("tenseal", reason=NO_TENSEAL)
    job = export_job(JOB, tmp_path, num_rounds=2, min_clients=3, spec=he_spec(timeouts={"train_s": 77}))
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    (train,) = [entry["filters"] for entry in client["task_result_filters"] if "train" in entry["tasks"]]
    # The PHI guard reads the plain result; the encryptor comes last.
    assert [f["path"].rsplit(".", 1)[-1] for f in train] == ["PHIGuardFilter", "HEModelEncryptor"]
    decrypt = [f["path"] for entry in client["task_data_filters"] for f in entry["filters"]]
    assert decrypt == ["nvflare.app_opt.he.model_decryptor.HEModelDecryptor"]
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    (workflow,) = server["workflows"]
    assert workflow["path"].endswith("ScatterAndGather")
    assert workflow["args"] | {"num_rounds": 2, "min_clients": 3, "train_timeout": 77} == workflow["args"]
    assert server["server"]["task_request_interval"] > 0
    assert any(c["path"].endswith("HEInTimeAccumulateWeightedAggregator") for c in server["components"])


@pytest.mark.slow
def test_he_job_on_loopback_deployment(tmp_path, he_sites):
    pytest.importorskip("tenseal", reason=NO_TENSEAL)
    from fedimaging.bundle import export_bundle
    from fedimaging.deploy.results import write_run_file
    from fedimaging.he_decrypt import HEDecryptError, decrypt_global_model

    started = time.monotonic()
    port, admin_port = free_port(), free_port()
    kits = provision(tmp_path / "provision", server_name="localhost", fed_learn_port=port, admin_port=admin_port,
                     he=True)
    assert (kits.kit("site-1") / "startup" / "client_context.tenseal").is_file()
    assert (kits.kit("localhost") / "startup" / "server_context.tenseal").is_file()
    for site in SITES:
        install_site_config(kits.kit(site), site, he_sites[site]["data"])
    job, initial = small_he_job(tmp_path / "jobs")

    with LocalDeployment(log_dir=tmp_path / "logs", environment=kit_environment(tmp_path)) as deployment:
        deployment.start_server(kits.kit("localhost"))
        assert wait_for_port("127.0.0.1", port, 60), deployment.log_tail("localhost")
        for site in SITES:
            deployment.start_client(kits.kit(site), environment={"FEDIMAGING_KEY_FILE": str(he_sites[site]["key"])})
        admin = open_session(LEAD, kits.kit(LEAD))
        try:
            assert wait_for_clients(admin, set(SITES), 60) == set(SITES), deployment.log_tail("site-1")
        finally:
            admin.close()
        meta, download = run_job_as_lead(kits, job, tmp_path / "he")
        assert meta["status"] == "FINISHED:COMPLETED", (meta, deployment.log_tail("localhost"))

        # The server holds ciphertexts only: no parameter of its global model is a plain tensor.
        server_model = sorted(download.glob("**/app_server/FL_global_model.pt"))
        assert server_model, f"no global model in {download}"
        stored = torch.load(server_model[0], map_location="cpu", weights_only=False)["model"]
        assert set(stored) == set(initial)
        assert all(isinstance(value, bytes) for value in stored.values()), {k: type(v) for k, v in stored.items()}
        with pytest.raises(Exception):
            torch.nn.Module.load_state_dict(torch.nn.Module(), stored)
        # No cross-site evaluation in an HE job: NVFlare's result file, when written, is empty.
        assert all(json.loads(path.read_text()) == {}
                   for path in download.glob("**/cross_site_val/cross_val_results.json"))

        # Only a site's kit holds the secret key.
        with pytest.raises(HEDecryptError, match="client_context.tenseal"):
            decrypt_global_model(download, kits.kit("localhost"), tmp_path / "refused")
        decrypted = decrypt_global_model(download, kits.kit("site-2"), tmp_path / "decrypted", n_sites=len(SITES))
        state = torch.load(decrypted.model_file, map_location="cpu", weights_only=True)["model"]
        assert decrypted.n_encrypted == len(initial)
        assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in initial.items()}
        changed = [k for k in initial if not torch.allclose(state[k], initial[k], atol=1e-4)]
        assert len(changed) > len(initial) // 2, f"training changed only {changed}"
        # Another site's key decrypts the same model (one context for the whole federation).
        command = [sys.executable, "-m", "fedimaging", "he-decrypt", str(download), "--kit", str(kits.kit("site-3")),
                   "--out", str(tmp_path / "decrypted3"), "--no-eval-job"]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
        assert completed.returncode == 0, completed.stderr
        other_state = torch.load(tmp_path / "decrypted3" / "FL_global_model.pt", map_location="cpu",
                                 weights_only=True)["model"]
        assert all(torch.allclose(other_state[k], state[k]) for k in state)

        eval_meta, eval_download = run_job_as_lead(kits, decrypted.eval_job, tmp_path / "eval")
        assert eval_meta["status"] == "FINISHED:COMPLETED", (eval_meta, deployment.log_tail("localhost"))
    assert not deployment.tagged_processes(), "processes left running after the deployment stopped"

    report = report_for(eval_download, tmp_path / "report")
    assert [site["site"] for site in report["sites"]] == SITES
    assert all(site["status"] == "ok" for site in report["sites"]), report["sites"]
    scored = [c for c in report["cells"] if c["value"] is not None]
    assert {c["site"] for c in scored} >= set(SITES), report["cells"]
    write_run_file(eval_download, decrypted.eval_job.name, SITES, rounds=1)
    bundle = export_bundle(eval_download, tmp_path / "bundle")
    bundled = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.allclose(bundled[k.removeprefix("net.")], state[k]) for k in state)
    assert time.monotonic() - started < 300
