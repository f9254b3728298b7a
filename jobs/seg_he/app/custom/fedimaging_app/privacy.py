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
from fedimaging_app.secagg import as_numpy


def epsilon_after(rounds: int, noise_multiplier: float, delta: float, sample_rate: float = 1.0) -> float:
    """ε for ``delta`` after ``rounds`` Gaussian mechanisms (Opacus RDP accountant)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))


def weights_and_reference(model: torch.nn.Module, global_params: dict) -> tuple[dict, dict]:
    """Return the model's weights and the received global weights as numpy arrays, name by name."""
    state = {name: as_numpy(value) for name, value in model.state_dict().items()}
    return state, {name: as_numpy(global_params[name]) for name in state}


def add_gaussian_noise(arrays: dict[str, np.ndarray], std: float, generator: np.random.Generator) -> dict:
    """Return ``arrays`` with N(0, std^2) noise added to every floating-point array, keeping each dtype.

    Integer buffers (for example batch-norm batch counts) carry no gradient information and stay as they are.
    """
    noised = {}
    for name, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            noised[name] = (value + generator.normal(0.0, std, size=value.shape)).astype(value.dtype)
        else:
            noised[name] = value
    return noised


def privatize_update(model: torch.nn.Module, global_params: dict, clip_norm: float, noise_multiplier: float,
                     generator: np.random.Generator) -> dict:
    """Clip the model's update and add Gaussian noise, in place; return what was done (norms, noise std)."""
    state, reference = weights_and_reference(model, global_params)
    norm_before = update_norm(state, reference)
    std = noise_multiplier * clip_norm
    noised = add_gaussian_noise(clip_update(state, reference, clip_norm), std, generator)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in noised.items()})
    return {"update_norm_before_clipping": norm_before, "noise_std": std}


# ------------------------------------------------------------------------------ site-enforced DP
try:
    from nvflare.apis.filter import Filter as _NVFlareFilter
except ImportError:  # the functions above work without NVFlare
    _NVFlareFilter = object

# Global models received for training, by task ID, until the site's result for that task goes out.
_RECEIVED: dict[str, dict[str, np.ndarray]] = {}


class SiteDPFilter(_NVFlareFilter):
    """Client-level DP that a site enforces for every job through its NVFlare privacy policy.

    List it both as a task data filter (it keeps the global model the site receives for ``train``)
    and as a task result filter (it clips the training result's change to ``clip_norm`` and adds
    Gaussian noise of standard deviation ``noise_multiplier * clip_norm``), in the same scope. It works
    on full weights and on weight differences. A training result that is neither (for example a masked
    update) is refused, because its noise cannot be checked here: such jobs must set
    ``differential_privacy`` in their own configuration, which the site then sees in the job.
    Noise from this filter comes on top of any noise the job adds itself.
    """

    def __init__(self, noise_multiplier: float = 1.0, clip_norm: float = 1.0, delta: float = 1e-5,
                 tasks: list[str] | None = None):
        super().__init__()
        if noise_multiplier <= 0 or clip_norm <= 0:
            raise ValueError("SiteDPFilter needs a positive noise_multiplier and clip_norm")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.delta = delta
        self.tasks = tasks or ["train"]
        self.rounds = 0
        self._rng = np.random.default_rng()

    def process(self, shareable, fl_ctx):
        from nvflare.apis.dxo import DataKind, from_shareable
        from nvflare.apis.fl_constant import FilterKey, FLContextKey

        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        if task not in self.tasks:
            return shareable
        task_id = str(fl_ctx.get_prop(FLContextKey.TASK_ID))
        dxo = from_shareable(shareable)
        arrays = {name: as_numpy(value) for name, value in (dxo.data or {}).items()}
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            if dxo.data_kind == DataKind.WEIGHTS:
                _RECEIVED[task_id] = arrays
            return shareable
        received = _RECEIVED.pop(task_id, None)
        if dxo.data_kind == DataKind.WEIGHT_DIFF:
            reference = {k: np.zeros_like(v) for k, v in arrays.items()}
        elif dxo.data_kind == DataKind.WEIGHTS and received is not None:
            reference = {k: received[k] for k in arrays if k in received}
        else:
            raise RuntimeError(f"this site requires differential privacy, but the result of task '{task}' is neither "
                               "weights nor weight differences it can noise (for example a masked update); the job "
                               "must set differential_privacy itself")
        weights = {k: arrays[k] for k in arrays if k in reference}
        norm_before = update_norm(weights, reference)
        std = self.noise_multiplier * self.clip_norm
        arrays.update(add_gaussian_noise(clip_update(weights, reference, self.clip_norm), std, self._rng))
        dxo.data = arrays
        self.rounds += 1
        self.log_info(fl_ctx, f"site DP: update norm {norm_before:.4g} clipped to {self.clip_norm:g}, noise std "
                              f"{std:g}; epsilon {epsilon_after(self.rounds, self.noise_multiplier, self.delta):.3f} "
                              f"at delta {self.delta:g} after {self.rounds} rounds")
        return dxo.update_shareable(shareable)
