"""Site configuration, label harmonisation, the marginal loss and the patient-level bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedimaging_app.config import ConfigError, JobConfig, load_site_config, locate_site_config
from fedimaging_app.seg_data import marginal_dice_ce, plan_classes
from fedimaging_app.site_data import PreparedData
from fedimaging_app.stats import MIN_CASES_FOR_INTERVAL, bootstrap_over_patients, mean_with_interval

JOB = JobConfig.model_validate({
    "task": "segmentation",
    "classes": {"aorta": "required", "liver": "optional"},
    "model": {"name": "unet"},
})


def write_site(tmp_path, text: str):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def prepared(cases: list[dict], items: list[dict]) -> PreparedData:
    return PreparedData(root=__import__("pathlib").Path("/data"), training=items, validation=[],
                        patient_of={}, manifest={"cases": cases}, manifest_sha256="0", classes=None)


def test_site_config_errors_name_field(tmp_path):
    path = write_site(tmp_path, "site_name: site-1\ndata_dir: d\nlabel_mapping:\n  aorta: {label_value: 52, mask: aorta}\n")
    with pytest.raises(ConfigError) as error:
        load_site_config(path)
    assert "label_mapping.aorta" in str(error.value)
    assert "exactly one" in str(error.value)

    path = write_site(tmp_path, "site_name: site-1\nlabel_mapping: {}\n")
    with pytest.raises(ConfigError) as error:
        load_site_config(path)
    assert "field 'data_dir'" in str(error.value)


def test_relative_data_dir_resolved(tmp_path):
    config = load_site_config(write_site(tmp_path, "site_name: s\ndata_dir: prepared\nlabel_mapping: {}\n"))
    assert config.data_dir == (tmp_path / "prepared").resolve()


def test_locate_site_config_order(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDIMAGING_SITE_CONFIG", raising=False)
    monkeypatch.delenv("FEDIMAGING_SITE_CONFIG_MAP", raising=False)
    workspace = tmp_path / "ws" / "job-1"
    workspace.mkdir(parents=True)
    (tmp_path / "ws" / "local").mkdir()
    local = tmp_path / "ws" / "local" / "fedimaging_site.yaml"
    local.write_text("x")
    assert locate_site_config("site-1", workspace) == local

    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"site-1": "/a.yaml"}))
    monkeypatch.setenv("FEDIMAGING_SITE_CONFIG_MAP", str(mapping))
    assert str(locate_site_config("site-1", workspace)) == "/a.yaml"
    with pytest.raises(ConfigError, match="site-9"):
        locate_site_config("site-9", workspace)

    monkeypatch.setenv("FEDIMAGING_SITE_CONFIG", "/explicit.yaml")
    assert str(locate_site_config("site-9", workspace)) == "/explicit.yaml"


def test_required_class_missing_fails_before_training(tmp_path):
    site = load_site_config(write_site(tmp_path, "site_name: s\ndata_dir: d\nlabel_mapping:\n  liver: {label_value: 5}\n"))
    data = prepared([{"case_id": "c1", "label_values": [0, 5]}], [{"case_id": "c1", "image": "i", "label": "l"}])
    with pytest.raises(ConfigError) as error:
        plan_classes(JOB, site, data)
    assert "required class 'aorta'" in str(error.value)


def test_optional_class_without_data_is_excluded(tmp_path):
    site = load_site_config(write_site(
        tmp_path, "site_name: s\ndata_dir: d\nlabel_mapping:\n  aorta: {label_value: 52}\n  liver: {label_value: 5}\n"))
    data = prepared([{"case_id": "c1", "label_values": [0, 52]}], [{"case_id": "c1", "image": "i", "label": "l"}])
    plans = plan_classes(JOB, site, data)
    assert [p.source is not None for p in plans] == [True, False]

    data = prepared([{"case_id": "c1", "label_values": [0, 5]}], [{"case_id": "c1", "image": "i", "label": "l"}])
    with pytest.raises(ConfigError, match="no prepared case carries the class 'aorta'"):
        plan_classes(JOB, site, data)


def test_marginal_loss_merges_unannotated_class():
    torch.manual_seed(0)
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1
    # The network is confident in class 2 (liver) where the truth is background; the site has no liver labels.
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[0, 2, 2:] = 10.0
    logits[0, 1, :2] = 10.0
    unannotated = marginal_dice_ce(logits, label, torch.tensor([[True, True, False]]))
    annotated = marginal_dice_ce(logits, label, torch.tensor([[True, True, True]]))
    # Counting liver as background would punish the liver prediction; merged into background it costs nothing.
    assert unannotated < 0.05
    assert annotated > 1.0

    logits.requires_grad_(True)
    marginal_dice_ce(logits, label, torch.tensor([[True, True, False]])).backward()
    assert torch.isfinite(logits.grad).all()


def test_bootstrap_resamples_patients():
    # Two patients with very different case values: intervals must reflect patients, not cases.
    values = np.array([0.9] * 10 + [0.1] * 2)
    patients = ["A"] * 10 + ["B"] * 2
    summary = mean_with_interval(values, patients, samples=500, seed=0)
    assert summary["n"] == 12
    assert summary["small_sample"] is False
    low, high = summary["ci95"]
    assert low <= 0.1 + 1e-9 and high >= 0.9 - 1e-9

    one_patient = bootstrap_over_patients(["A"] * 6, lambda idx: 1.0, samples=100, seed=0)
    assert one_patient is None


def test_small_sample_has_no_interval():
    summary = mean_with_interval(np.ones(MIN_CASES_FOR_INTERVAL - 1), ["a", "b", "c", "d"][: MIN_CASES_FOR_INTERVAL - 1],
                                 samples=100, seed=0)
    assert summary["small_sample"] is True
    assert summary["ci95"] is None
