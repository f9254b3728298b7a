"""Classification training with DataLoader worker processes, on the real Kather tiles.

The workers write batches into reused shared memory (``fedimaging_app.batch_slots``). A slot
filled at the wrong time would change the pixels of a training step. So the test trains the same
model twice, with reused slots and with new shared memory for every batch (the plain DataLoader
path), and requires identical weights, losses and validation metrics.
"""

from __future__ import annotations

import torch

from fedimaging_app.cls_engine import ClassificationEngine
from fedimaging_app.config import SiteConfig, load_job_config
from fedimaging_app.site_data import load_prepared
from preprocessing.prepare_wsi import WsiOptions, prepare_wsi
from tests.conftest import DATA, REPO, require

KATHER = DATA / "pathology" / "tiles" / "kather2016"
JOB = REPO / "jobs" / "cls_fedavg" / "app" / "custom" / "fedimaging_job.json"


def _small_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 2))


def _train_and_validate(out, job) -> tuple[dict, list[float], dict]:
    site = SiteConfig(site_name="site-1", data_dir=out, num_workers=2,
                      label_mapping={"tumour": {"local_classes": ["TUMOR"]}, "other": {"all_other_classes": True}})
    engine = ClassificationEngine(job, site, load_prepared(out), torch.device("cpu"))
    model = _small_model()
    try:
        # 3 rounds of 6 steps over 3 batches of training tiles: 9 batches per worker, more than its slots.
        losses = [engine.train(model, None, None, round_number) for round_number in range(3)]
        metrics = engine.validate(model)
    finally:
        for loader in engine._loaders.values():
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None:
                iterator._shutdown_workers()
    return model.state_dict(), losses, metrics


def test_slots_train_like_plain_loader(tmp_path, monkeypatch):
    out = tmp_path / "kather"
    prepare_wsi(WsiOptions(source=require(KATHER), out=out, key_file=tmp_path / "site.key", assume_mpp=0.495))
    job = load_job_config(JOB)

    weights, losses, metrics = _train_and_validate(out, job)
    # Workers are forked after this patch, so they never keep a slot.
    monkeypatch.setattr("fedimaging_app.batch_slots._room_for", lambda nbytes: False)
    plain_weights, plain_losses, plain_metrics = _train_and_validate(out, job)

    assert losses == plain_losses
    assert all(torch.equal(weights[name], plain_weights[name]) for name in weights)
    assert metrics == plain_metrics
    assert metrics["n_cases"] > 0
