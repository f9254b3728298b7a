"""Reply checks and aggregation against the aggregation fault cases."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from fedimaging_app.aggregation import AggregationError, Reply, aggregate, check_reply, clip_update, update_norm
from tests.conftest import CASES, require

CASE = CASES / "10-fl-aggregation"


def load_scenario(name: str):
    folder = require(CASE) / name
    manifest = json.loads((folder / "manifest.json").read_text())
    replies = []
    for site, info in manifest["sites"].items():
        with np.load(folder / f"{site}.npz") as data:
            replies.append(Reply(site, {key: data[key] for key in data.files}, info["num_examples"]))
    keys = manifest.get("global_model_keys") or sorted(replies[0].params)
    shapes = {}
    for key in keys:
        source = next(r.params for r in replies if key in r.params)
        shapes[key] = source[key].shape
    return replies, shapes, manifest


def expected(name: str) -> dict:
    return json.loads((CASE / "expected.json").read_text())["scenarios"][name]


def assert_params(actual: dict, wanted: dict) -> None:
    assert sorted(actual) == sorted(wanted)
    for key, value in wanted.items():
        np.testing.assert_allclose(actual[key], np.array(value), atol=1e-6, err_msg=key)


def test_all_zero_examples_fails_naming_sites():
    replies, shapes, manifest = load_scenario("a_all_zero_examples")
    with pytest.raises(AggregationError) as error:
        aggregate(replies, shapes, min_clients=manifest["min_clients"])
    message = str(error.value)
    for site in expected("a_all_zero_examples")["error_should_name"]:
        assert site in message
    assert "total aggregation weight is 0" in message


def test_zero_example_site_excluded():
    truth = expected("b_one_site_zero")
    replies, shapes, manifest = load_scenario("b_one_site_zero")
    params, verdicts = aggregate(replies, shapes, min_clients=manifest["min_clients"])
    assert_params(params, truth["global_params"])
    assert [v.site for v in verdicts if v.accepted] == truth["contributors"]
    excluded = {v.site: v.reasons for v in verdicts if not v.accepted}
    assert excluded == {"site-1": ["0 examples"]}


def test_nan_site_rejected_with_positions():
    truth = expected("c_nan_site")
    replies, shapes, manifest = load_scenario("c_nan_site")
    params, verdicts = aggregate(replies, shapes, min_clients=manifest["min_clients"])
    assert_params(params, truth["global_params"])
    rejected = {v.site: sorted(v.reasons) for v in verdicts if not v.accepted}
    assert rejected == {site: sorted(reasons) for site, reasons in truth["rejected"].items()}
    assert all(np.all(np.isfinite(value)) for value in params.values())


def test_key_mismatch_prefix_stripped_and_rejected():
    truth = expected("d_key_mismatch")
    replies, shapes, manifest = load_scenario("d_key_mismatch")
    params, verdicts = aggregate(replies, shapes, min_clients=manifest["min_clients"])
    assert_params(params, truth["global_params_if_prefix_stripped_and_site3_rejected"])
    by_site = {v.site: v for v in verdicts}
    assert by_site["site-2"].accepted and "module." in by_site["site-2"].notes[0]
    assert not by_site["site-3"].accepted
    assert by_site["site-3"].reasons == ["missing keys: bn.running_mean", "unexpected keys: fc.weight"]


def test_too_few_valid_replies_fail():
    replies, shapes, _ = load_scenario("c_nan_site")
    with pytest.raises(AggregationError, match="fewer than min_clients=3"):
        aggregate(replies, shapes, min_clients=3)


def test_order_independent():
    replies, shapes, _ = load_scenario("b_one_site_zero")
    reference, _ = aggregate(replies, shapes)
    for seed in range(5):
        shuffled = replies[:]
        random.Random(seed).shuffle(shuffled)
        params, _ = aggregate(shuffled, shapes)
        for key in reference:
            np.testing.assert_array_equal(params[key], reference[key])


def test_robust_methods_resist_outlier():
    shapes = {"w": (3,)}
    replies = [Reply(f"site-{i}", {"w": np.full(3, 1.0 + 0.01 * i, dtype=np.float32)}, 10) for i in range(4)]
    replies.append(Reply("site-9", {"w": np.full(3, 1000.0, dtype=np.float32)}, 10))
    mean, _ = aggregate(replies, shapes)
    median, _ = aggregate(replies, shapes, method="median")
    trimmed, _ = aggregate(replies, shapes, method="trimmed_mean", trim_fraction=0.2)
    assert mean["w"][0] > 100
    assert median["w"][0] == pytest.approx(1.02, abs=1e-6)
    assert trimmed["w"][0] == pytest.approx(np.mean([1.01, 1.02, 1.03]), abs=1e-6)


def test_update_norm_clipping():
    reference = {"w": np.zeros(4, dtype=np.float32)}
    params = {"w": np.array([3.0, 4.0, 0.0, 0.0], dtype=np.float32)}
    assert update_norm(params, reference) == pytest.approx(5.0)
    clipped = clip_update(params, reference, 1.0)
    assert update_norm(clipped, reference) == pytest.approx(1.0, rel=1e-6)
    verdict = check_reply(Reply("s", params, 1), {"w": (4,)}, max_update_norm=1.0, reference=reference)
    assert verdict.accepted and "clipped" in verdict.notes[0]


def test_nvflare_aggregator_excludes_bad_reply():
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedimaging_app.server_aggregator import CheckedAggregator

    truth = expected("c_nan_site")
    replies, _, _ = load_scenario("c_nan_site")
    aggregator = CheckedAggregator(min_clients=2)
    for reply in reversed(replies):
        aggregator.accept_model(FLModel(params=reply.params, meta={
            "client_name": reply.site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: reply.weight}))
    result = aggregator.aggregate_model()
    assert_params(result.params, truth["global_params"])
    assert list(result.meta["fedimaging_excluded_sites"]) == ["site-2"]

    zero, _, _ = load_scenario("a_all_zero_examples")
    for reply in zero:
        aggregator.accept_model(FLModel(params=reply.params, meta={
            "client_name": reply.site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: reply.weight}))
    with pytest.raises(AggregationError, match="total aggregation weight is 0"):
        aggregator.aggregate_model()


def test_dp_epsilon_matches_accountant():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedimaging_app.privacy import epsilon_after

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for noise_multiplier, rounds, delta in ((1.0, 10, 1e-5), (2.0, 5, 1e-6), (0.8, 20, 1e-5)):
        rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
        reference, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        assert epsilon_after(rounds, noise_multiplier, delta) == pytest.approx(float(reference), rel=1e-9)
    assert epsilon_after(10, 2.0, 1e-5) < epsilon_after(10, 1.0, 1e-5) < epsilon_after(20, 1.0, 1e-5)


def test_dp_noise_reaches_update():
    import torch

    from fedimaging_app.privacy import privatize_update

    model = torch.nn.Linear(100, 100)
    global_params = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # an update of norm 100, far above the clip norm
    result = privatize_update(model, global_params, clip_norm=1.0, noise_multiplier=0.5,
                              generator=np.random.default_rng(0))
    assert result["update_norm_before_clipping"] == pytest.approx(100.0, rel=1e-4)
    update = (model.weight - global_params["weight"]).detach().numpy()
    # Clipped to norm 1 over 10 000 weights: each weight moved by 0.01, plus N(0, 0.5^2) noise.
    assert update.std() == pytest.approx(0.5, rel=0.05)
    assert abs(update.mean() - 0.01) < 0.02


def test_dp_job_refuses_robust_aggregation_and_local_models(tmp_path):
    from fedimaging_app.config import JobConfig
    from jobs.build import SPECS, export_job

    spec = json.loads((SPECS / "cls_fedavg.json").read_text())
    spec["differential_privacy"] = {"noise_multiplier": 1.0, "clip_norm": 1.0}
    spec["aggregation"] = {"method": "median"}
    with pytest.raises(ValueError, match="calibrated for FedAvg"):
        JobConfig.model_validate(spec)

    spec["aggregation"] = {"method": "weighted_mean"}
    job = export_job("cls_fedavg", tmp_path, spec=spec)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    (evaluation,) = [w for w in server["workflows"] if w["path"].endswith("CrossSiteModelEval")]
    assert evaluation["args"]["submit_model_task_name"] == ""
