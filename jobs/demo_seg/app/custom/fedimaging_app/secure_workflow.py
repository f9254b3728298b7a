"""FedAvg with pairwise-masking secure aggregation as an NVFlare workflow (server side; no torch import).

Each round runs four NVFlare tasks (see ``fedimaging_app.secagg`` for the protocol):
``secagg_keys`` (sites send fresh public keys and their case counts), ``secagg_shares`` (sites send
Shamir shares encrypted to each other; the server relays them), ``train`` (sites train, check and mask
their weighted update) and ``secagg_unmask`` (survivors reveal the shares the server needs). The
server never sees a single site's update, only the weighted sum of the survivors' updates.

What the server can still check: each reply's parameter layout (names and shapes) against the global
model, the vector length, and the case counts (positive, finite). Sites check their own update before
masking (finite values, norm bound, fixed-point range). A site whose reply fails a check, or that
drops after the key exchange, is left out of the sum through share recovery; fewer than the
threshold (a majority of the round's sites) or fewer than ``min_clients`` survivors fail the round
with an error instead of producing a wrong model.
"""

from __future__ import annotations

import math
import time

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.fuel.utils.log_utils import center_message

from fedimaging_app.secagg import SecAggError, as_numpy, model_layout, site_order, threshold_for, unmask_sum

KEYS_TASK = "secagg_keys"
SHARES_TASK = "secagg_shares"
UNMASK_TASK = "secagg_unmask"
MASKED_KEY = "secagg_masked"
META_KEY = "secagg"


class SecureFedAvg(FedAvg):
    """FedAvg whose aggregate is computed from masked updates (Bonawitz et al., CCS 2017).

    Args (besides FedAvg's): ``train_timeout`` seconds to wait for training replies (0: never time
    out; a site that never answers then stalls the round), ``phase_timeout`` seconds for the key,
    share and unmask tasks, ``min_clients`` the fewest surviving sites a round accepts (never fewer
    than the protocol's threshold). A round needs at least 3 participating sites: with 2, each could
    compute the other's update from the aggregate.
    """

    def __init__(self, *args, train_timeout: int = 3600, phase_timeout: int = 300, min_clients: int = 2, **kwargs):
        kwargs.pop("aggregator", None)
        super().__init__(*args, **kwargs)
        self.train_timeout = int(train_timeout)
        self.phase_timeout = int(phase_timeout)
        self.min_clients = int(min_clients)
        self.round_log: list[dict] = []

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> None:
        self.info(center_message("Start FedAvg with secure aggregation."))
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        model = self.load_model()
        model.start_round = self.start_round
        model.total_rounds = self.num_rounds
        for self.current_round in range(self.start_round, self.start_round + self.num_rounds):
            self.info(center_message(message=f"Round {self.current_round} started.", boarder_str="-"))
            model.current_round = self.current_round
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            clients = self.sample_clients(self.num_clients)
            try:
                aggregate = self._secure_round(model, clients)
            except SecAggError as error:
                message = f"secure aggregation round {self.current_round} failed: {error}"
                self.error(message)
                self.system_panic(message, self.fl_ctx)
                return
            self.fire_event_with_data(AppEventType.AFTER_AGGREGATION, self.fl_ctx, AppConstants.AGGREGATION_RESULT,
                                      aggregate)
            model = self.update_model(model, aggregate)
            self.save_model(model)
            if self.abort_signal.triggered:
                return
        self.info(center_message("Finished FedAvg with secure aggregation."))

    def _ask(self, task_name: str, meta: dict, targets: list[str], timeout: int, params: dict | None = None,
             model: FLModel | None = None) -> dict[str, FLModel]:
        data = model if model is not None else FLModel(params=params or {}, meta={})
        data.meta = {**(data.meta or {}), META_KEY: meta}
        results = self.send_model_and_wait(task_name=task_name, data=data, targets=targets, timeout=timeout)
        replies = {}
        for result in results or []:
            site = str((result.meta or {}).get("client_name", ""))
            if site in targets:
                replies[site] = result
        return replies

    def _secure_round(self, model: FLModel, clients: list[str]) -> FLModel:
        job_id = self.fl_ctx.get_job_id() if self.fl_ctx else "job"
        context = f"{job_id}|round {self.current_round}"
        started = time.monotonic()
        excluded: dict[str, list[str]] = {}

        # 1. Keys and case counts.
        replies = self._ask(KEYS_TASK, {"context": context}, clients, self.phase_timeout)
        public_keys, weights = {}, {}
        for site in clients:
            reply = replies.get(site)
            info = ((reply.meta or {}).get(META_KEY) if reply else None) or {}
            weight = info.get("n_cases")
            if reply is None or "c_pk" not in info:
                excluded[site] = ["no public keys before the timeout"]
                continue
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                excluded[site] = [f"case count {weight!r} is not a positive number"]
                continue
            public_keys[site] = {"c_pk": info["c_pk"], "s_pk": info["s_pk"]}
            weights[site] = float(weight)
        self._need(len(public_keys), "sites sent public keys", 3)

        # 2. Encrypted shares, relayed.
        keyed = site_order(public_keys)
        replies = self._ask(SHARES_TASK, {"context": context, "public_keys": public_keys}, keyed, self.phase_timeout)
        mailbox: dict[str, dict[str, str]] = {site: {} for site in keyed}
        participants = []
        for site in keyed:
            info = ((replies[site].meta or {}).get(META_KEY) if site in replies else None) or {}
            shares = info.get("shares")
            if not isinstance(shares, dict) or set(shares) != set(keyed) - {site}:
                excluded[site] = ["no complete set of secret shares before the timeout"]
                continue
            participants.append(site)
            for recipient, blob in shares.items():
                mailbox[recipient][site] = blob
        self._need(len(participants), "sites sent secret shares", 3)
        total_weight = sum(weights[s] for s in participants)

        # 3. Training with masked replies.
        expected_layout = model_layout(model.params)
        n_values = int(sum(np.prod(shape, dtype=np.int64) for _, shape in expected_layout))
        meta = {"context": context, "participants": participants, "public_keys": {s: public_keys[s] for s in participants},
                "mailbox": {s: mailbox[s] for s in participants}, "total_weight": total_weight}
        replies = self._ask(self.task_name, meta, participants, self.train_timeout, model=model)
        masked, metrics = {}, {}
        for site in participants:
            reply = replies.get(site)
            if reply is None:
                excluded[site] = ["no masked update before the timeout (dropped after the key exchange)"]
                continue
            info = (reply.meta or {}).get(META_KEY) or {}
            vector = (reply.params or {}).get(MASKED_KEY)
            problems = []
            if info.get("error"):
                problems.append(f"the site refused to send an update: {info['error']}")
            elif vector is None:
                problems.append("the reply holds no masked update")
            else:
                vector = as_numpy(vector).reshape(-1).view(np.uint32)
                if info.get("layout") != expected_layout:
                    problems.append("its parameter names or shapes differ from the global model's")
                if vector.size != n_values:
                    problems.append(f"its masked vector has {vector.size} values, the model {n_values}")
            if problems:
                excluded[site] = problems
                continue
            masked[site] = vector
            if reply.metrics:
                metrics[site] = reply.metrics
        for site, reasons in excluded.items():
            self.warning(f"excluded {site} from round {self.current_round}: {'; '.join(reasons)}")
        survivors = site_order(masked)
        self._need(len(survivors), "sites sent valid masked updates", threshold_for(len(participants)))
        dropped = [s for s in participants if s not in masked]

        # 4. Unmask.
        replies = self._ask(UNMASK_TASK, {"context": context, "survivors": survivors, "dropped": dropped},
                            survivors, self.phase_timeout)
        revelations = {}
        for site, reply in replies.items():
            info = (reply.meta or {}).get(META_KEY) or {}
            if isinstance(info.get("revealed"), dict):
                revelations[site] = info["revealed"]
        weighted_sum = unmask_sum(masked, {s: public_keys[s] for s in participants}, participants, revelations,
                                  context)
        surviving_weight = sum(weights[s] for s in survivors)
        mean_update = weighted_sum * (total_weight / surviving_weight)

        params, offset = {}, 0
        for name in sorted(model.params):
            base = as_numpy(model.params[name])
            size = base.size
            new = base.astype(np.float64) + mean_update[offset:offset + size].reshape(base.shape)
            params[name] = new.astype(base.dtype) if np.issubdtype(base.dtype, np.floating) else np.rint(new).astype(base.dtype)
            offset += size
        self.round_log.append({"round": self.current_round, "participants": participants, "survivors": survivors,
                               "dropped": dropped, "seconds": time.monotonic() - started})
        self.info(f"round {self.current_round}: unmasked the weighted sum of {len(survivors)} sites "
                  f"({', '.join(survivors)}); left out: {', '.join(dropped) or 'none'}")
        aggregated_metrics = _weighted_metrics(metrics, weights)
        return FLModel(params=params, params_type=ParamsType.FULL, metrics=aggregated_metrics,
                       meta={"fedimaging_excluded_sites": excluded, "nr_aggregated": len(survivors),
                             "current_round": self.current_round, FLMetaKey.NUM_STEPS_CURRENT_ROUND: surviving_weight})

    def _need(self, count: int, what: str, threshold: int = 0) -> None:
        needed = max(self.min_clients, threshold)
        if count < needed:
            raise SecAggError(f"only {count} {what}, fewer than the {needed} this job requires")


def _weighted_metrics(metrics: dict[str, dict], weights: dict[str, float]) -> dict | None:
    """Case-weighted mean of each scalar metric the sites reported about the received global model."""
    if not metrics:
        return None
    keys = set.intersection(*(set(m) for m in metrics.values()))
    out = {}
    for key in keys:
        values = [(float(m[key]), weights[s]) for s, m in metrics.items() if isinstance(m[key], (int, float))]
        if values:
            out[key] = sum(v * w for v, w in values) / sum(w for _, w in values)
    return out or None
