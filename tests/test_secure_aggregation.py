"""Secure aggregation: the masking protocol on its own, the job configuration rules, and a real simulator run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedimaging_app.config import JobConfig
from fedimaging_app.secagg import (
    CHUNK,
    LIMIT,
    SecAggError,
    SiteRound,
    add_stream,
    decode,
    encode,
    encode_update,
    flatten_update,
    stream_uint32,
    threshold_for,
    unmask_sum,
)
from jobs.build import REPO, SPECS, export_job
from tests.conftest import DATA, require
from tests.support.cli import fedimaging, write_site_config

KATHER = DATA / "pathology" / "tiles" / "kather2016"
RECORDER = Path(__file__).parent / "support" / "secagg_recorder.py"
TOLERANCE_PER_SITE = 2.0**-21  # fixed-point rounding of one site's value


def run_protocol(updates: dict[str, np.ndarray], weights: dict[str, float], dropped=(), context="job|round 0"):
    """Run all four phases in one process; return (server's sum, expected sum over survivors, masked vectors)."""
    sites = sorted(updates)
    rounds = {s: SiteRound(s, context) for s in sites}
    public = {s: rounds[s].advertise() for s in sites}
    outgoing = {s: rounds[s].make_shares(public) for s in sites}
    total = sum(weights.values())
    masked = {}
    for s in sites:
        rounds[s].set_participants(sites)
        vector = rounds[s].mask(updates[s], weights[s] / total)
        if s not in dropped:
            masked[s] = vector
    survivors = [s for s in sites if s not in dropped]
    revealed = {}
    for s in survivors:
        rounds[s].receive_shares({u: outgoing[u][s] for u in sites if u != s})
        revealed[s] = rounds[s].reveal(survivors, list(dropped))
    result = unmask_sum(masked, public, sites, sites, revealed, context)
    expected = sum(weights[s] / total * updates[s] for s in survivors)
    return result, expected, masked


def updates_for(n_sites: int, size: int = 5000, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    names = [f"site-{i}" for i in range(1, n_sites + 1)]
    return ({s: rng.normal(0, 0.05, size) for s in names}, {s: float(rng.integers(1, 40)) for s in names})


def test_masked_sum_equals_weighted_sum_of_updates():
    updates, weights = updates_for(4)
    result, expected, _ = run_protocol(updates, weights)
    assert np.max(np.abs(result - expected)) <= 4 * TOLERANCE_PER_SITE


@pytest.mark.parametrize("n_sites,dropped", [(3, ("site-2",)), (5, ("site-1", "site-4")), (8, ("site-8", "site-3", "site-5"))])
def test_dropped_sites_are_recovered_and_left_out(n_sites, dropped):
    updates, weights = updates_for(n_sites, seed=n_sites)
    result, expected, _ = run_protocol(updates, weights, dropped=dropped)
    assert np.max(np.abs(result - expected)) <= n_sites * TOLERANCE_PER_SITE
    # The dropped sites' updates are really absent: including them would give another answer.
    with_all = sum(weights[s] / sum(weights.values()) * updates[s] for s in updates)
    assert np.max(np.abs(result - with_all)) > 1e-3


def test_too_few_survivors_fail_instead_of_giving_a_wrong_sum():
    updates, weights = updates_for(5)
    with pytest.raises(SecAggError, match="threshold"):
        run_protocol(updates, weights, dropped=("site-1", "site-2", "site-3"))


def test_masked_vector_is_uncorrelated_with_the_update():
    updates, weights = updates_for(3, size=200_000)
    _, _, masked = run_protocol(updates, weights)
    for site, vector in masked.items():
        r = np.corrcoef(vector.astype(np.float64), updates[site])[0, 1]
        assert abs(r) < 0.01, (site, r)
        # Reading the masked vector as fixed point gives nothing like the update either.
        assert abs(np.corrcoef(decode(vector), updates[site])[0, 1]) < 0.01


def test_fixed_point_round_trip_and_range():
    values = np.array([-2047.5, -1.0, -1e-6, 0.0, 3e-7, 0.5, 2047.9])
    assert np.max(np.abs(decode(encode(values, 1.0)) - values)) <= TOLERANCE_PER_SITE
    site = SiteRound("site-1", "c")
    site.participants = ["site-1", "site-2", "site-3"]
    with pytest.raises(SecAggError, match="fixed-point range"):
        site.mask(np.array([0.0, LIMIT]), 0.5)
    with pytest.raises(SecAggError, match="NaN or infinite"):
        site.mask(np.array([0.0, np.nan]), 0.5)


def test_key_stream_blocks_match_cipher():
    """The block-wise key stream equals one ChaCha20 pass over zeros, across block boundaries."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key, length = bytes(range(32)), 2 * CHUNK + 12345
    whole = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * length))
    expected = np.frombuffer(whole, dtype="<u4")
    assert np.array_equal(stream_uint32(key, length), expected)
    target = np.full(length, 2**32 - 1, dtype=np.uint32)
    add_stream(target, key)
    assert np.array_equal(target, expected - np.uint32(1))  # wraps around instead of overflowing
    add_stream(target, key, subtract=True)
    assert np.all(target == 2**32 - 1)


def test_block_encoding_matches_flat_encoding():
    import torch

    rng = np.random.default_rng(3)
    reference = {"b.weight": torch.from_numpy(rng.normal(size=(CHUNK + 7,)).astype(np.float32)),
                 "a.bias": torch.from_numpy(rng.normal(size=(3, 5)).astype(np.float32)),
                 "c.steps": torch.tensor(4, dtype=torch.int64)}
    trained = {k: v + (torch.from_numpy(rng.normal(0, 1e-2, size=tuple(v.shape)).astype(np.float32))
                       if v.is_floating_point() else 1) for k, v in reference.items()}
    flat = flatten_update(trained, reference)
    assert np.array_equal(encode_update(trained, reference, 0.37), encode(flat, 0.37))
    site = SiteRound("site-1", "c")
    site.participants = ["site-1", "site-2", "site-3"]
    site.public_keys = {s: {"s_pk": bytes.fromhex(SiteRound(s, "c").advertise()["s_pk"])} for s in ("site-2", "site-3")}
    assert np.array_equal(site.mask_update(trained, reference, 0.37), site.mask(flat, 0.37))
    trained["b.weight"][CHUNK + 3] = float("inf")
    with pytest.raises(SecAggError, match="update of b.weight contains NaN or infinite"):
        encode_update(trained, reference, 0.37)
    with pytest.raises(SecAggError, match=r"weight fraction 1.5 is not in \(0, 1\]"):
        encode(flat, 1.5)


def test_site_refuses_to_reveal_both_shares_of_one_site_or_to_reveal_twice():
    updates, weights = updates_for(3)
    sites = sorted(updates)
    rounds = {s: SiteRound(s, "ctx") for s in sites}
    public = {s: rounds[s].advertise() for s in sites}
    outgoing = {s: rounds[s].make_shares(public) for s in sites}
    for s in sites:
        rounds[s].set_participants(sites)
        rounds[s].receive_shares({u: outgoing[u][s] for u in sites if u != s})
    with pytest.raises(SecAggError, match="both surviving and dropped"):
        rounds["site-1"].reveal(["site-1", "site-2", "site-3"], ["site-3"])
    rounds["site-1"].reveal(["site-1", "site-2"], ["site-3"])
    with pytest.raises(SecAggError, match="already revealed"):
        rounds["site-1"].reveal(["site-1", "site-2", "site-3"], [])


def test_tampered_or_misaddressed_shares_fail_authentication():
    sites = ["site-1", "site-2", "site-3"]
    rounds = {s: SiteRound(s, "ctx") for s in sites}
    public = {s: rounds[s].advertise() for s in sites}
    outgoing = {s: rounds[s].make_shares(public) for s in sites}
    blob = bytearray(bytes.fromhex(outgoing["site-2"]["site-1"]))
    blob[-1] ^= 1
    rounds["site-1"].set_participants(sites)
    with pytest.raises(SecAggError, match="failed authentication"):
        rounds["site-1"].receive_shares({"site-2": blob.hex(), "site-3": outgoing["site-3"]["site-1"]})
    # A share addressed to site-3 does not open at site-1.
    with pytest.raises(SecAggError, match="failed authentication"):
        rounds["site-1"].receive_shares({"site-2": outgoing["site-2"]["site-3"], "site-3": outgoing["site-3"]["site-1"]})


def test_site_refuses_keys_it_did_not_advertise():
    sites = ["site-1", "site-2", "site-3"]
    rounds = {s: SiteRound(s, "ctx") for s in sites}
    public = {s: rounds[s].advertise() for s in sites}
    public["site-1"] = SiteRound("site-1", "ctx").advertise()  # a server substituting keys
    with pytest.raises(SecAggError, match="other public keys"):
        rounds["site-1"].make_shares(public)


def test_fewer_than_three_sites_refuse_to_mask():
    rounds = {s: SiteRound(s, "ctx") for s in ("site-1", "site-2")}
    public = {s: r.advertise() for s, r in rounds.items()}
    with pytest.raises(SecAggError, match="at least 3 sites"):
        rounds["site-1"].make_shares(public)


def test_threshold_is_a_majority():
    assert [threshold_for(n) for n in (3, 4, 5, 8)] == [2, 3, 3, 5]


# ------------------------------------------------------------------------------------ job configuration
def base_spec(**extra) -> dict:
    spec = json.loads((SPECS / "seg_fedavg.json").read_text())
    spec.update(extra)
    return spec


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregation_with_masking_is_refused(method):
    with pytest.raises(ValueError, match="cannot be combined with secure_aggregation"):
        JobConfig.model_validate(base_spec(secure_aggregation={}, aggregation={"method": method}))


@pytest.mark.parametrize("protection", [{"secure_aggregation": {}},
                                        {"differential_privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0}}])
def test_local_model_evaluation_with_masking_or_dp_is_refused(protection):
    with pytest.raises(ValueError, match="unprotected local model"):
        JobConfig.model_validate(base_spec(cross_site_models="global_and_local", **protection))
    assert JobConfig.model_validate(base_spec(**protection)).evaluates_local_models is False
    assert JobConfig.model_validate(base_spec()).evaluates_local_models is True


def test_secure_job_uses_the_secure_workflow_and_global_models_only():
    config = json.loads((REPO / "jobs" / "seg_secagg" / "app" / "config" / "config_fed_server.json").read_text())
    paths = {w["path"]: w.get("args", {}) for w in config["workflows"]}
    assert "fedimaging_app.secure_workflow.SecureFedAvg" in paths
    assert not any(p.endswith(".FedAvg") for p in paths)
    cross_site = next(args for p, args in paths.items() if p.endswith("CrossSiteModelEval"))
    assert cross_site["submit_model_task_name"] == ""


# ------------------------------------------------------------------------------------ real simulator run


def three_kather_sites(tmp_path: Path) -> list[Path]:
    """Split the Kather tiles into three sites (one tile of each class per site) and prepare them."""
    sites = []
    for index, name in enumerate(["site-a", "site-b", "site-c"]):
        source = tmp_path / f"kather_{name}"
        for class_folder in sorted(require(KATHER).iterdir()):
            if class_folder.is_dir():
                tile = sorted(class_folder.iterdir())[index]
                (source / class_folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(tile, source / class_folder.name / tile.name)
        fedimaging("prepare", "wsi", source, "--out", tmp_path / f"prep_{name}", "--assume-mpp", "0.495",
                   "--key-file", tmp_path / "keys" / name)
        site_file = tmp_path / f"{name}.yaml"
        write_site_config(site_file, name, tmp_path / f"prep_{name}",
                          {"tumour": {"local_classes": ["TUMOR"]}, "other": {"all_other_classes": True}})
        sites.append(site_file)
    return sites


def secure_classification_job(tmp_path: Path, recorder_dir: Path, rounds: int, train_timeout: int = 600,
                              validation_timeout: int | None = None) -> Path:
    spec = json.loads((SPECS / "cls_fedavg.json").read_text())
    spec["secure_aggregation"] = {"phase_timeout_s": 120}
    spec["timeouts"] = {"train_s": train_timeout, "validation_s": validation_timeout or 1800}
    job = export_job("cls_secagg", tmp_path / "jobs", num_rounds=rounds, min_clients=3, spec=spec)
    shutil.copy(RECORDER, job / "app" / "custom" / RECORDER.name)
    config_path = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(config_path.read_text())
    config["components"].append({"id": "secagg_recorder", "path": "secagg_recorder.SecAggRecorder",
                                 "args": {"folder": str(recorder_dir)}})
    config_path.write_text(json.dumps(config, indent=2))
    return job


def flat(arrays: dict) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).reshape(-1) for k in sorted(arrays)])


@pytest.mark.slow
def test_simulator_run_server_sees_only_masked_updates_and_gets_fedavg(tmp_path):
    sites = three_kather_sites(tmp_path)
    server_record, site_record = tmp_path / "server_record", tmp_path / "site_record"
    rounds = 2
    job = secure_classification_job(tmp_path, server_record, rounds)
    env = {**os.environ, "FEDIMAGING_TEST_RECORD_DIR": str(site_record)}
    workspace = tmp_path / "ws"
    fedimaging("simulate", job, "--sites", *sites, "--workspace", workspace, "--rounds", rounds, env=env)

    names = ["site-a", "site-b", "site-c"]
    for r in range(rounds):
        records = {s: np.load(site_record / s / f"round_{r}.npz") for s in names}
        received = {s: np.load(server_record / "received" / f"{s}_{r}.npy") for s in names}
        for s in names:
            # The server received exactly the masked vector, 4 bytes per value, and nothing like the update.
            assert received[s].dtype.itemsize == 4
            assert np.array_equal(received[s].reshape(-1).view(np.uint32), records[s]["masked"])
            true_update = records[s]["weighted_update"]
            assert true_update.size > 1_000_000
            r_value = np.corrcoef(received[s].reshape(-1).view(np.uint32).astype(np.float64), true_update)[0, 1]
            assert abs(r_value) < 0.01, (s, r, r_value)
        # The new global model is plaintext FedAvg of the true updates, within fixed-point rounding.
        reference = records["site-a"]["reference"]
        plaintext = reference + sum(records[s]["weighted_update"] for s in names)
        aggregate = flat(dict(np.load(server_record / f"aggregate_{r}.npz")))
        assert np.allclose(aggregate, plaintext, rtol=1e-6, atol=3 * TOLERANCE_PER_SITE + 1e-7)
        assert np.max(np.abs(aggregate - reference)) > 1e-4  # training moved the model

    fedimaging("report", workspace, "--out", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    models = {c["model"] for c in report["cells"]}
    assert models and all("global" in m.lower() for m in models), models


def kill_simulated_site(site: str, marker: str) -> bool:
    """SIGKILL the NVFlare simulator worker process of ``site`` whose command line contains ``marker``."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any("simulator_worker" in a for a in text) and site in text and any(marker in a for a in text):
            os.kill(int(proc.name), signal.SIGKILL)
            return True
    return False


@pytest.mark.slow
def test_site_killed_after_masking_leaves_the_correct_aggregate_of_the_others(tmp_path):
    import time

    sites = three_kather_sites(tmp_path)
    server_record, site_record = tmp_path / "server_record", tmp_path / "site_record"
    job = secure_classification_job(tmp_path, server_record, rounds=1, train_timeout=60, validation_timeout=30)
    env = {**os.environ, "FEDIMAGING_TEST_RECORD_DIR": str(site_record),
           "FEDIMAGING_TEST_PAUSE_AFTER_MASKING": "site-c=600"}
    workspace = tmp_path / "ws"
    command = [sys.executable, "-m", "fedimaging", "simulate", str(job), "--sites", *map(str, sites),
               "--workspace", str(workspace), "--rounds", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    killed = False
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            if not killed and (site_record / "site-c" / "round_0.npz").exists():
                time.sleep(1)  # the record is written just before the pause
                killed = kill_simulated_site("site-c", str(workspace))
            time.sleep(1)
        output = process.communicate(timeout=600)[0] if process.poll() is None else process.stdout.read()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert killed, "the site-c worker process was not found"
    log = (workspace / "simulator.log").read_text() if (workspace / "simulator.log").exists() else output
    aggregate_file = server_record / "aggregate_0.npz"
    assert not (server_record / "received" / "site-c_0.npy").exists()
    if not aggregate_file.exists():
        # The alternative the protocol allows: a clean failure of the round, never a wrong model.
        assert "secure aggregation round 0 failed" in log, log[-3000:]
        return
    records = {s: np.load(site_record / s / "round_0.npz") for s in ["site-a", "site-b"]}
    surviving_fraction = sum(float(r["fraction"]) for r in records.values())
    reference = records["site-a"]["reference"]
    expected = reference + sum(r["weighted_update"] for r in records.values()) / surviving_fraction
    aggregate = flat(dict(np.load(aggregate_file)))
    assert np.allclose(aggregate, expected, rtol=1e-6, atol=(2 * TOLERANCE_PER_SITE) / surviving_fraction + 1e-7)
    assert "left out: site-c" in log


def test_simulate_rejects_invalid_job_before_starting(tmp_path):
    from fedimaging.simulate import SimulationError, simulate

    job = tmp_path / "seg_secagg"
    shutil.copytree(REPO / "jobs" / "seg_secagg", job)
    job_file = job / "app" / "custom" / "fedimaging_job.json"
    spec = json.loads(job_file.read_text())
    spec["aggregation"] = {**spec.get("aggregation", {}), "method": "median"}
    job_file.write_text(json.dumps(spec))
    with pytest.raises(SimulationError) as raised:
        simulate(job, [tmp_path / "site-1.yaml"], tmp_path / "workspace")
    assert str(job_file) in str(raised.value)
    assert "cannot be combined with secure_aggregation" in str(raised.value)
    assert not (tmp_path / "workspace").exists()
