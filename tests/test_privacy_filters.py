"""NVFlare privacy filters chosen in the job configuration: rules, the exported job, and a simulator run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fedimaging_app.config import JobConfig
from jobs.build import SPECS, export_job
from tests.support.cli import fedimaging
from tests.test_secure_aggregation import RECORDER, three_kather_sites

KEPT_LOCAL = ["net.fc.weight", "net.fc.bias"]


def cls_spec(**extra) -> dict:
    spec = json.loads((SPECS / "cls_fedavg.json").read_text())
    spec.update(extra)
    return spec


def test_filters_with_masking_or_dp_are_refused():
    filters = [{"name": "percentile", "args": {"percentile": 90}}]
    with pytest.raises(ValueError, match="choose one protection"):
        JobConfig.model_validate(cls_spec(privacy_filters=filters, secure_aggregation={}))
    with pytest.raises(ValueError, match="choose one protection"):
        JobConfig.model_validate(cls_spec(privacy_filters=filters,
                                          differential_privacy={"noise_multiplier": 1.0, "clip_norm": 1.0}))
    with pytest.raises(ValueError, match="same filter twice"):
        JobConfig.model_validate(cls_spec(privacy_filters=filters * 2))
    with pytest.raises(ValueError, match="list of parameter names"):
        JobConfig.model_validate(cls_spec(privacy_filters=[{"name": "exclude_vars", "args": {"exclude_vars": "fc.*"}}]))
    assert JobConfig.model_validate(cls_spec(privacy_filters=filters)).sends_differences
    assert not JobConfig.model_validate(cls_spec()).sends_differences


def test_exported_job_applies_filters_to_training_results_only(tmp_path):
    spec = cls_spec(privacy_filters=[{"name": "svt", "args": {"fraction": 0.2}},
                                     {"name": "exclude_vars", "args": {"exclude_vars": KEPT_LOCAL}}])
    job = export_job("cls_filtered", tmp_path, num_rounds=1, spec=spec)
    config = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    chains = {tuple(c["tasks"]): [f["path"].rsplit(".", 1)[-1] for f in c["filters"]] for c in config["task_result_filters"]}
    assert chains[("train",)] == ["SVTPrivacy", "ExcludeVars", "PHIGuardFilter"]
    assert chains[("validate", "submit_model", "secagg_keys", "secagg_shares", "secagg_unmask")] == ["PHIGuardFilter"]
    svt = config["task_result_filters"][0]["filters"][0]["args"]
    assert svt == {"fraction": 0.2, "data_kinds": ["WEIGHT_DIFF"]}
    (data_chain,) = config["task_data_filters"]
    assert data_chain["tasks"] == ["train"] and data_chain["filters"][0]["args"]["exclude_vars"] == KEPT_LOCAL
    # Exported as plain lists: no copies of the standard library in custom/.
    assert not list((job / "app" / "custom").rglob("re.py"))


@pytest.mark.slow
def test_simulator_run_with_percentile_and_exclude_vars(tmp_path):
    sites = three_kather_sites(tmp_path)
    spec = cls_spec(privacy_filters=[{"name": "percentile", "args": {"percentile": 90, "gamma": 0.1}},
                                     {"name": "exclude_vars", "args": {"exclude_vars": KEPT_LOCAL}}])
    job = export_job("cls_filtered", tmp_path / "jobs", num_rounds=2, spec=spec)
    shutil.copy(RECORDER, job / "app" / "custom" / RECORDER.name)
    config_path = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(config_path.read_text())
    record = tmp_path / "server_record"
    config["components"].append({"id": "recorder", "path": "secagg_recorder.SecAggRecorder",
                                 "args": {"folder": str(record)}})
    config_path.write_text(json.dumps(config, indent=2))
    workspace = tmp_path / "ws"
    fedimaging("simulate", job, "--sites", *sites, "--workspace", workspace, "--rounds", 2)
    for round_number in (0, 1):
        aggregate = dict(np.load(record / f"aggregate_{round_number}.npz"))
        # The server aggregated weight differences without the layers kept at the sites.
        assert not set(KEPT_LOCAL) & set(aggregate)
        assert "net.conv1.weight" in aggregate
        floats = np.concatenate([v.reshape(-1) for v in aggregate.values() if v.dtype.kind == "f"])
        assert np.mean(floats == 0.0) > 0.5  # the percentile filter left most changes at the sites
        assert np.max(np.abs(floats)) > 0.0
    fedimaging("report", workspace, "--out", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [c for c in report["cells"] if c["value"] is not None]


def _context(task: str, task_id: str, direction: str):
    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.apis.fl_context import FLContext

    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_ID, task_id, private=True, sticky=False)
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, direction, private=True, sticky=False)
    return ctx


def test_site_dp_filter_clips_and_noises_what_the_site_sends():
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_constant import FilterKey

    from fedimaging_app.privacy import SiteDPFilter

    rng = np.random.default_rng(0)
    received = {"w": rng.normal(size=10_000).astype(np.float32), "count": np.array([3])}
    trained = {"w": received["w"] + 1.0, "count": np.array([4])}  # an update of norm 100
    site_filter = SiteDPFilter(noise_multiplier=0.5, clip_norm=2.0)
    site_filter.process(DXO(DataKind.WEIGHTS, received).to_shareable(), _context("train", "t1", FilterKey.IN))
    out = from_shareable(site_filter.process(DXO(DataKind.WEIGHTS, trained).to_shareable(),
                                             _context("train", "t1", FilterKey.OUT))).data
    change = out["w"] - received["w"]
    # Clipped to norm 2 (each value 0.02) plus noise of std 1 per value.
    assert abs(np.std(change) - 1.0) < 0.05
    assert abs(np.mean(change) - 0.02) < 0.05
    assert out["count"][0] == 4  # integer buffers are not noised
    # Validation results pass untouched; a result it cannot noise is refused.
    metrics = DXO(DataKind.METRICS, {"dice": 0.5}).to_shareable()
    assert site_filter.process(metrics, _context("validate", "t2", FilterKey.OUT)) is metrics
    with pytest.raises(RuntimeError, match="requires differential privacy"):
        site_filter.process(DXO(DataKind.WEIGHTS, trained).to_shareable(), _context("train", "never-received", FilterKey.OUT))
