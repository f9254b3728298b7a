"""Benchmark client: stands in for training with a small random step, then sends the update plain or masked.

Masking goes through fedimaging's own site code (``fedimaging_app.client_loop.SecureAggregationSite``),
so the benchmark measures the product's protocol, not a copy of it.
"""

import os
import time

import torch

import nvflare.client as flare
from bench_model import FlatNet
from fedimaging_app.client_loop import SecureAggregationSite


class Engine:
    n_training_cases = 10


def main():
    flare.init()
    site = flare.get_site_name()
    secure = SecureAggregationSite(site, Engine())
    model = None
    generator = torch.Generator().manual_seed(abs(hash(site)) % 2**31)
    while flare.is_running():
        incoming = flare.receive()
        task = flare.get_task_name()
        if secure.handles(task):
            flare.send(secure.answer(task, incoming))
            continue
        if model is None:
            model = FlatNet(n_params=sum(v.numel() for v in incoming.params.values()))
        model.load_state_dict(incoming.params)
        time.sleep(float(os.environ.get("BENCH_TRAIN_SECONDS", "0")))  # local training time at a real site
        with torch.no_grad():  # the "training" step
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
        metrics = {"dice_mean": 0.0}
        if (incoming.meta or {}).get("secagg"):
            flare.send(secure.masked_reply(model, incoming, metrics))
        else:
            flare.send(flare.FLModel(params={k: v.detach() for k, v in model.state_dict().items()}, metrics=metrics,
                                     meta={"NUM_STEPS_CURRENT_ROUND": Engine.n_training_cases}))


if __name__ == "__main__":
    main()
