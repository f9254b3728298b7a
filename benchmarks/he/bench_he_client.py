"""Benchmark site: the job's own network, one small random step instead of training, then the reply.

Plain and HE rounds send the weights, and in HE jobs the encryptor filter encrypts them after this
script. Masked rounds go through fedimaging's own site code (``SecureAggregationSite``).
"""

import json
from pathlib import Path

import torch

import nvflare.client as flare
from fedimaging_app.client_loop import SecureAggregationSite
from fedimaging_app.config import JobConfig
from fedimaging_app.models import build_model

N_CASES = 10


class Engine:
    n_training_cases = N_CASES


def main():
    flare.init()
    site = flare.get_site_name()
    job = JobConfig.model_validate(json.loads((Path(__file__).parent / "fedimaging_job.json").read_text()))
    model = build_model(job)
    secure = SecureAggregationSite(site, Engine())
    generator = torch.Generator().manual_seed(sum(site.encode()))
    while flare.is_running():
        incoming = flare.receive()
        task = flare.get_task_name()
        if secure.handles(task):
            flare.send(secure.answer(task, incoming))
            continue
        model.load_state_dict({k: torch.as_tensor(v).reshape(model.state_dict()[k].shape)
                               for k, v in incoming.params.items()})
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
        metrics = {"dice_mean": 0.0}
        if (incoming.meta or {}).get("secagg"):
            flare.send(secure.masked_reply(model, incoming, metrics))
        else:
            flare.send(flare.FLModel(params={k: v.detach().clone() for k, v in model.state_dict().items()},
                                     metrics=metrics, meta={"NUM_STEPS_CURRENT_ROUND": N_CASES}))


if __name__ == "__main__":
    main()
