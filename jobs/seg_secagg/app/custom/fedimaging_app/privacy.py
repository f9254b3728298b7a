"""Client-level differential privacy for FedAvg: clip each site's update, add Gaussian noise at the site.

Each round a site scales its update (trained weights minus the received global model) to an L2 norm of
at most ``clip_norm`` and adds noise N(0, (noise_multiplier * clip_norm)^2) to every coordinate before
sending, so the server never receives an un-noised update. Every site takes part in every round, so
the privacy loss of one site's contribution after T rounds is that of T Gaussian mechanisms with
sampling rate 1, accounted with Opacus's RDP accountant.
"""

from __future__ import annotations

import numpy as np
import torch

from fedimaging_app.aggregation import clip_update, update_norm


def epsilon_after(rounds: int, noise_multiplier: float, delta: float, sample_rate: float = 1.0) -> float:
    """ε for ``delta`` after ``rounds`` Gaussian mechanisms (Opacus RDP accountant)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))


def privatize_update(model: torch.nn.Module, global_params: dict, clip_norm: float, noise_multiplier: float,
                     generator: np.random.Generator) -> dict:
    """Clip the model's update and add Gaussian noise, in place; return what was done (norms, noise std)."""
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    reference = {k: np.asarray(global_params[k].cpu() if hasattr(global_params[k], "cpu") else global_params[k])
                 for k in state}
    norm_before = update_norm(state, reference)
    clipped = clip_update(state, reference, clip_norm)
    std = noise_multiplier * clip_norm
    noised = {}
    for name, value in clipped.items():
        if np.issubdtype(value.dtype, np.floating):
            noised[name] = (value + generator.normal(0.0, std, size=value.shape)).astype(value.dtype)
        else:
            noised[name] = value  # integer buffers (e.g. batch counts) carry no gradient information
    model.load_state_dict({k: torch.as_tensor(v) for k, v in noised.items()})
    return {"update_norm_before_clipping": norm_before, "noise_std": std}
