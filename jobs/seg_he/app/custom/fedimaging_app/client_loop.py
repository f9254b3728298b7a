"""The NVFlare Client API loop shared by the segmentation and classification client scripts.

Tasks: ``train`` (validate the received global model, train locally, send weights weighted by the
number of training cases), ``validate`` (cross-site evaluation: send summary metrics only) and
``submit_model`` (send this site's last local model for cross-site evaluation).
"""

from __future__ import annotations

import copy
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from fedimaging_app import __version__
from fedimaging_app.config import (
    JOB_CONFIG_FILE_NAME,
    ConfigError,
    JobConfig,
    file_sha256,
    load_job_config,
    load_site_config,
    locate_site_config,
)
from fedimaging_app.models import build_model
from fedimaging_app.phi_guard import install_log_guard, load_site_identifiers
from fedimaging_app.privacy import epsilon_after, privatize_update, weights_and_reference
from fedimaging_app.secagg import SecAggError, SiteRound, flatten_update, model_layout
from fedimaging_app.site_data import load_prepared

logger = logging.getLogger(__name__)


def select_device(preference: str) -> torch.device:
    """CUDA when requested or available (``auto``), else CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested in the site configuration but no CUDA device is available")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from monai.utils import set_determinism

    set_determinism(seed=seed)


def _versions() -> dict:
    import monai

    try:
        import nvflare

        nvflare_version = nvflare.__version__
    except ImportError:  # the loop always runs under NVFlare; kept for offline use of engines
        nvflare_version = "unknown"
    return {"fedimaging": __version__, "monai": str(monai.__version__), "torch": str(torch.__version__), "nvflare": str(nvflare_version)}


def clip_model_update(model: torch.nn.Module, global_params: dict, max_norm: float) -> float:
    """Scale the model's update (its weights minus ``global_params``) to at most ``max_norm``; return the norm before."""
    from fedimaging_app.aggregation import clip_update, update_norm

    state, reference = weights_and_reference(model, global_params)
    norm = update_norm(state, reference)
    if norm > max_norm:
        clipped = clip_update(state, reference, max_norm)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in clipped.items()})
        logger.info("update norm %.4g clipped to %.4g", norm, max_norm)
    return norm


def load_global(model: torch.nn.Module, params: dict, job: JobConfig) -> None:
    """Load a received global model; parameters an exclude_vars filter keeps local may be absent."""
    if not job.kept_local:
        model.load_state_dict(params)
        return
    result = model.load_state_dict(params, strict=False)
    unexpected_missing = [k for k in result.missing_keys if k not in job.kept_local]
    if result.unexpected_keys or unexpected_missing:
        raise ConfigError(f"the received model does not match this job's network: missing {unexpected_missing}, "
                          f"unexpected {result.unexpected_keys}")


def metrics_message(engine, result: dict, job: JobConfig, provenance: dict) -> dict:
    """Build the summary a site sends for one model: the fedimaging metrics contract, never per-case values."""
    return {
        "fedimaging_metrics": 1,
        "task": job.task,
        "primary_metric": engine.primary_metric,
        "metrics": result["metrics"],
        "n_cases": result["n_cases"],
        "n_patients": result["n_patients"],
        "status": "ok",
        "reason": None,
        "note": engine.note,
        **provenance,
    }


def run(engine_factory, custom_dir: Path) -> None:
    """Run the client loop; ``engine_factory(job, site, data, device)`` builds the task's engine."""
    import nvflare.client as flare

    flare.init()
    site_name = flare.get_site_name()
    job_path = custom_dir / JOB_CONFIG_FILE_NAME
    job = load_job_config(job_path)
    site_path = locate_site_config(site_name)
    site = load_site_config(site_path)
    if site.site_name != site_name:
        raise ConfigError(f"{site_path}: site_name '{site.site_name}' does not match this NVFlare client '{site_name}'")
    try:
        # The PHI guard needs the identifiers recorded by fedimaging prepare; without them, no training.
        install_log_guard(load_site_identifiers(site_name))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if site.torch_threads:
        torch.set_num_threads(site.torch_threads)
    seed_everything(job.seed)
    device = select_device(site.device)
    data = load_prepared(site.data_dir)
    engine = engine_factory(job, site, data, device)
    logger.info("site %s: %d training and %d validation cases, device %s, %d data loader worker process(es)",
                site_name, engine.n_training_cases, len(engine.val_items), device, site.num_workers)
    provenance = {"manifest_sha256": data.manifest_sha256, "site_config_sha256": file_sha256(site_path),
                  "job_config_sha256": file_sha256(job_path), "seed": job.seed, "versions": _versions()}
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(Path.cwd() / "tensorboard" / site_name))
    except ImportError:
        logger.warning("tensorboard is not installed; no training curves are written")

    model = build_model(job).to(device)
    local_state = None
    round_number = 0
    rounds_done = 0
    privacy = None
    # Noise must not be reproducible by others, so it does not come from the job's seed.
    noise_rng = np.random.default_rng()
    secure = SecureAggregationSite(site_name, engine) if job.secure_aggregation is not None else None
    while flare.is_running():
        incoming = flare.receive()
        if secure is not None and secure.handles(flare.get_task_name()):
            flare.send(secure.answer(flare.get_task_name(), incoming))
            continue
        if flare.is_submit_model():
            if not job.evaluates_local_models:
                # A local model is neither masked nor differentially private; such jobs never request it.
                logger.error("site %s: refused to send its local model: this job evaluates global models only "
                             "(secure aggregation or differential privacy is on)", site_name)
                flare.send(flare.FLModel(params={}))
                continue
            state = local_state if local_state is not None else model.state_dict()
            flare.send(flare.FLModel(params={k: v.cpu() for k, v in state.items()}))
            continue
        load_global(model, incoming.params, job)
        if flare.is_evaluate():
            message = metrics_message(engine, engine.validate(model), job, provenance)
            message["differential_privacy"] = privacy
            flare.send(flare.FLModel(metrics=message))
            continue
        round_number = incoming.current_round or round_number
        before = engine.validate(model)
        global_copy = copy.deepcopy(model).eval() if job.fedprox_mu > 0 else None
        loss = engine.train(model, global_copy, writer, round_number)
        if job.differential_privacy is not None:
            dp = job.differential_privacy
            privatize_update(model, incoming.params, dp.clip_norm, dp.noise_multiplier, noise_rng)
            rounds_done += 1
            privacy = {"epsilon": epsilon_after(rounds_done, dp.noise_multiplier, dp.delta), "delta": dp.delta,
                       "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm, "rounds": rounds_done}
            logger.info("site %s: differential privacy spent so far: epsilon %.3f at delta %g after %d rounds",
                        site_name, privacy["epsilon"], dp.delta, rounds_done)
        elif job.aggregation.max_update_norm is not None:
            clip_model_update(model, incoming.params, job.aggregation.max_update_norm)
        local_state = copy.deepcopy(model.state_dict()) if job.evaluates_local_models else None
        primary = before["metrics"][engine.primary_metric]["value"]
        if writer is not None:
            writer.add_scalar(f"validation/{engine.primary_metric}_of_global_model", primary or 0.0, round_number)
            writer.flush()
        logger.info("site %s round %d: loss %.4f, %s of the received global model %s", site_name, round_number,
                    loss, engine.primary_metric, primary)
        metrics = {engine.primary_metric: primary if primary is not None else 0.0}
        if secure is not None:
            flare.send(secure.masked_reply(model, incoming, metrics))
            continue
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        params_type = flare.ParamsType.FULL
        if job.sends_differences:
            # NVFlare's privacy filters work on what changed, so send weights minus the received model.
            state = {k: v - torch.as_tensor(incoming.params[k]).cpu() for k, v in state.items() if k in incoming.params}
            params_type = flare.ParamsType.DIFF
        flare.send(flare.FLModel(
            params=state,
            params_type=params_type,
            metrics=metrics,
            meta={"NUM_STEPS_CURRENT_ROUND": engine.n_training_cases},
        ))
    if writer is not None:
        writer.close()


class SecureAggregationSite:
    """This site's side of secure aggregation (``fedimaging_app.secagg``): keys, shares, masking, unmasking.

    It keeps the secrets of at most the current round and the next two (see
    ``fedimaging_app.secure_workflow`` for which task carries which step).
    """

    TASKS = ("secagg_keys", "secagg_shares", "secagg_unmask")

    def __init__(self, site_name: str, engine):
        self.site_name = site_name
        self.engine = engine
        self.rounds: dict[str, SiteRound] = {}

    def handles(self, task_name: str) -> bool:
        return task_name in self.TASKS

    @staticmethod
    def _info(incoming) -> dict:
        info = (incoming.meta or {}).get("secagg") if incoming is not None else None
        if not isinstance(info, dict) or not info.get("context"):
            raise SecAggError("the task carries no secure-aggregation data; the job's server and client disagree")
        return info

    def _round(self, context: str) -> SiteRound:
        if context not in self.rounds:
            raise SecAggError(f"the server asked about '{context}', for which this site made no keys")
        return self.rounds[context]

    def _new_round(self, context: str | None) -> dict | None:
        if not context:
            return None
        self.rounds[context] = SiteRound(self.site_name, context)
        return self.rounds[context].advertise()

    def answer(self, task_name: str, incoming):
        import nvflare.client as flare

        info = self._info(incoming)
        if task_name == "secagg_keys":
            self.rounds = {}  # a new setup: earlier secrets are never used again
            reply = {"keys": self._new_round(info["context"]), "next_keys": self._new_round(info.get("next_context")),
                     "n_cases": self.engine.n_training_cases}
        elif task_name == "secagg_shares":
            reply = {"shares": self._round(info["context"]).make_shares(info["public_keys"])}
        else:
            current = self._round(info["context"])
            current.receive_shares(info["mailbox"].get(self.site_name, {}))
            reply = {"revealed": current.reveal(info["survivors"], info["dropped"]),
                     "next_keys": self._new_round(info.get("next_context")), "n_cases": self.engine.n_training_cases}
            del self.rounds[info["context"]]
            logger.info("site %s: revealed shares to unmask %s (survivors %s, dropped %s)", self.site_name,
                        info["context"], info["survivors"], info["dropped"])
        return flare.FLModel(params={}, meta={"secagg": reply})

    def masked_reply(self, model: torch.nn.Module, incoming, metrics: dict):
        """Check this site's update, mask it and build the reply; a failed check sends the reason, no values."""
        import nvflare.client as flare

        info = self._info(incoming)
        try:
            current = self._round(info["context"])
            current.set_participants(info["participants"])
            relayed = {site: keys for site, keys in info["public_keys"].items()}
            if any(current.public_keys.get(site, {}).get("s_pk", b"").hex() != keys["s_pk"] for site, keys in relayed.items()):
                raise SecAggError("the keys relayed for training differ from the ones relayed for the shares")
            fraction = self.engine.n_training_cases / float(info["total_weight"])
            masked = current.mask_update(model.state_dict(), incoming.params, fraction)
            upcoming = info.get("next")
            next_shares = self._round(upcoming["context"]).make_shares(upcoming["public_keys"]) if upcoming else None
        except SecAggError as error:
            logger.error("site %s: no update sent this round: %s", self.site_name, error)
            return flare.FLModel(params={}, meta={"secagg": {"error": str(error)}})
        logger.info("site %s: masked its update for %s (%d values)", self.site_name, info["context"], masked.size)
        record = os.environ.get(TEST_RECORD_ENV)
        if record:  # tests compare what the server received with the true update
            folder = Path(record) / self.site_name
            folder.mkdir(parents=True, exist_ok=True)
            update = flatten_update(model.state_dict(), incoming.params)
            np.savez(folder / f"{info['context'].rsplit('|', 1)[-1].replace(' ', '_')}.npz", weighted_update=update * fraction,
                     fraction=fraction,
                     reference=flatten_update(incoming.params, {k: torch.zeros_like(v) for k, v in incoming.params.items()}),
                     masked=masked)
        site, _, seconds = os.environ.get(TEST_PAUSE_ENV, "").partition("=")
        if site == self.site_name and seconds:  # fault-injection tests kill the site during this pause
            import time

            time.sleep(float(seconds))
        return flare.FLModel(params={"secagg_masked": torch.from_numpy(masked.view(np.int32))}, metrics=metrics,
                             meta={"secagg": {"layout": model_layout(incoming.params), "next_shares": next_shares},
                                   "NUM_STEPS_CURRENT_ROUND": self.engine.n_training_cases})


# Tests only: "SITE=SECONDS", how long that site waits between masking its update and sending it,
# and a folder where each site writes its true weighted update next to the masked one. Never set
# these at a real site: the record holds the unmasked update.
TEST_PAUSE_ENV = "FEDIMAGING_TEST_PAUSE_AFTER_MASKING"
TEST_RECORD_ENV = "FEDIMAGING_TEST_RECORD_DIR"


def custom_folder() -> Path:
    """Return the job's custom folder, which contains the client script and the job configuration."""
    return Path(os.path.dirname(os.path.abspath(__file__))).parent
