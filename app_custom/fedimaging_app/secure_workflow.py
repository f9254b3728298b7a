"""FedAvg with pairwise-masking secure aggregation as an NVFlare workflow (server side; no torch import).

The protocol (``fedimaging_app.secagg``) needs, for every round, public keys from every site, then
secret shares from every site, then the masked updates, then the unmasking shares. To keep rounds
short, the steps of the next round ride on the tasks of the current one:

- setup (first round, and whenever the set of sites changes): ``secagg_keys`` (keys for this round
  and the next, case counts) and ``secagg_shares`` (encrypted Shamir shares for this round);
- ``train``: the global model, this round's participants and keys, and the next round's keys; each
  site replies with its masked update and its encrypted shares for the next round;
- ``secagg_unmask``: the survivors, dropped sites and the shares addressed to each site; each site
  replies with the shares the server needs, and its keys for the round after next.

So a round in steady state costs one task more than plain FedAvg. The server relays keys and
ciphertexts it cannot read and never sees a single site's update, only the weighted sum of the
survivors' updates.

What the server can still check: each reply's parameter layout (names and shapes) against the global
model, the vector length, and the case counts (positive, finite). Sites check their own update before
masking (finite values, norm bound, fixed-point range). A site whose reply fails a check, or that
drops after sending its shares, is left out of the sum through share recovery; fewer survivors than
the threshold (a majority of the round's roster) or than ``min_clients`` fail the round with an error
instead of producing a wrong model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.fuel.utils.log_utils import center_message

from fedimaging_app.secagg import SecAggError, as_numpy, decode, model_layout, site_order, threshold_for, unmask_ring

KEYS_TASK = "secagg_keys"
SHARES_TASK = "secagg_shares"
UNMASK_TASK = "secagg_unmask"
MASKED_KEY = "secagg_masked"
META_KEY = "secagg"


@dataclass
class RoundKeys:
    """What the server holds about one round before its training: keys, then shares as they arrive."""

    context: str
    public_keys: dict[str, dict] = field(default_factory=dict)  # the roster's keys
    weights: dict[str, float] = field(default_factory=dict)
    mailbox: dict[str, dict[str, str]] = field(default_factory=dict)  # recipient -> sender -> ciphertext
    shared: list[str] = field(default_factory=list)  # roster sites whose complete shares arrived

    @property
    def roster(self) -> list[str]:
        return site_order(self.public_keys)

    def add_shares(self, sender: str, shares) -> bool:
        """File one site's shares; only a complete set addressed to the rest of the roster counts."""
        if not isinstance(shares, dict) or set(shares) != set(self.roster) - {sender}:
            return False
        for recipient, blob in shares.items():
            self.mailbox.setdefault(recipient, {})[sender] = blob
        self.shared.append(sender)
        return True


def _valid_keys(info: dict) -> bool:
    return isinstance(info, dict) and isinstance(info.get("c_pk"), str) and isinstance(info.get("s_pk"), str)


def _valid_weight(weight) -> bool:
    return isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0


class SecureFedAvg(FedAvg):
    """FedAvg whose aggregate is computed from masked updates (Bonawitz et al., CCS 2017).

    Args (besides FedAvg's): ``train_timeout`` seconds to wait for training replies, ``phase_timeout``
    seconds for the key, share and unmask tasks, ``min_clients`` the fewest surviving sites a round
    accepts (never fewer than the protocol's threshold). A round needs at least 3 participating sites:
    with 2, each could compute the other's update from the aggregate.
    """

    def __init__(self, *args, train_timeout: int = 3600, phase_timeout: int = 300, min_clients: int = 2, **kwargs):
        kwargs.pop("aggregator", None)
        super().__init__(*args, **kwargs)
        self.train_timeout = int(train_timeout)
        self.phase_timeout = int(phase_timeout)
        self.min_clients = int(min_clients)
        self.round_log: list[dict] = []
        self._current: RoundKeys | None = None  # prepared for the round about to run
        self._next: RoundKeys | None = None  # keys (and, after training, shares) for the round after

    def _context(self, round_number: int) -> str:
        job_id = self.fl_ctx.get_job_id() if self.fl_ctx else "job"
        return f"{job_id}|round {round_number}"

    def _last_round(self) -> int:
        return self.start_round + self.num_rounds - 1

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

    def _ask(self, task_name: str, meta: dict, targets: list[str], timeout: int,
             model: FLModel | None = None) -> dict[str, FLModel]:
        data = model if model is not None else FLModel(params={}, meta={})
        data.meta = {**(data.meta or {}), META_KEY: meta}
        results = self.send_model_and_wait(task_name=task_name, data=data, targets=targets, timeout=timeout)
        replies = {}
        for result in results or []:
            site = str((result.meta or {}).get("client_name", ""))
            if site in targets:
                replies[site] = result
        return replies

    @staticmethod
    def _info(reply: FLModel | None) -> dict:
        info = ((reply.meta or {}).get(META_KEY) if reply is not None else None) or {}
        return info if isinstance(info, dict) else {}

    def _setup(self, clients: list[str], excluded: dict[str, list[str]]) -> RoundKeys:
        """Key exchange and share relay for the current round (and keys for the next)."""
        context, next_context = self._context(self.current_round), self._next_context()
        replies = self._ask(KEYS_TASK, {"context": context, "next_context": next_context}, clients, self.phase_timeout)
        current, upcoming = RoundKeys(context), RoundKeys(next_context) if next_context else None
        for site in clients:
            info = self._info(replies.get(site))
            if not _valid_keys(info.get("keys")):
                excluded[site] = ["no public keys before the timeout"]
                continue
            if not _valid_weight(info.get("n_cases")):
                excluded[site] = [f"case count {info.get('n_cases')!r} is not a positive number"]
                continue
            current.public_keys[site] = info["keys"]
            current.weights[site] = float(info["n_cases"])
            if upcoming is not None and _valid_keys(info.get("next_keys")):
                upcoming.public_keys[site] = info["next_keys"]
                upcoming.weights[site] = float(info["n_cases"])
        self._need(len(current.public_keys), "sites sent public keys", 3)
        replies = self._ask(SHARES_TASK, {"context": context, "public_keys": current.public_keys}, current.roster,
                            self.phase_timeout)
        for site in current.roster:
            if not current.add_shares(site, self._info(replies.get(site)).get("shares")):
                excluded[site] = ["no complete set of secret shares before the timeout"]
        self._next = upcoming
        return current

    def _next_context(self, ahead: int = 1) -> str | None:
        round_number = self.current_round + ahead
        return self._context(round_number) if round_number <= self._last_round() else None

    def _secure_round(self, model: FLModel, clients: list[str]) -> FLModel:
        started = time.monotonic()
        excluded: dict[str, list[str]] = {}
        context = self._context(self.current_round)
        current = self._current
        if current is None or current.context != context or set(current.shared) != set(clients):
            current = self._setup(clients, excluded)
        participants = site_order(current.shared)
        self._need(len(participants), "sites sent secret shares", 3)
        total_weight = sum(current.weights[s] for s in participants)

        # Training: masked updates back, with shares for the next round.
        upcoming = self._next if self._next is not None and len(self._next.public_keys) >= 3 else None
        expected_layout = model_layout(model.params)
        n_values = int(sum(np.prod(shape, dtype=np.int64) for _, shape in expected_layout))
        meta = {"context": context, "participants": participants, "total_weight": total_weight,
                "public_keys": {s: current.public_keys[s] for s in participants},
                "next": {"context": upcoming.context, "public_keys": upcoming.public_keys} if upcoming else None}
        replies = self._ask(self.task_name, meta, participants, self.train_timeout, model=model)
        masked, metrics = {}, {}
        for site in participants:
            reply = replies.get(site)
            if reply is None:
                excluded[site] = ["no masked update before the timeout (dropped after sending its shares)"]
                continue
            info = self._info(reply)
            if upcoming is not None:
                upcoming.add_shares(site, info.get("next_shares"))
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
        self._need(len(survivors), "sites sent valid masked updates", threshold_for(len(current.roster)))
        dropped = [s for s in participants if s not in masked]

        # Unmask; sites also send their keys for the round after next.
        after_next = self._next_context(2)
        replies = self._ask(UNMASK_TASK, {"context": context, "survivors": survivors, "dropped": dropped,
                                          "mailbox": {s: current.mailbox.get(s, {}) for s in survivors},
                                          "next_context": after_next}, survivors, self.phase_timeout)
        revelations, following = {}, RoundKeys(after_next) if after_next else None
        for site, reply in replies.items():
            info = self._info(reply)
            if isinstance(info.get("revealed"), dict):
                revelations[site] = info["revealed"]
            if following is not None and _valid_keys(info.get("next_keys")) and _valid_weight(info.get("n_cases")):
                following.public_keys[site] = info["next_keys"]
                following.weights[site] = float(info["n_cases"])
        weighted_sum = unmask_ring(masked, current.public_keys, current.roster, participants, revelations, context)
        surviving_weight = sum(current.weights[s] for s in survivors)
        factor = total_weight / surviving_weight

        params, offset = {}, 0
        for name in sorted(model.params):
            base = as_numpy(model.params[name])
            size = base.size
            mean_update = decode(weighted_sum[offset:offset + size])
            mean_update *= factor
            new = base.astype(np.float64) + mean_update.reshape(base.shape)
            params[name] = new.astype(base.dtype) if np.issubdtype(base.dtype, np.floating) else np.rint(new).astype(base.dtype)
            offset += size
        self._current, self._next = upcoming, following
        self.round_log.append({"round": self.current_round, "participants": participants, "survivors": survivors,
                               "dropped": dropped, "seconds": time.monotonic() - started})
        self.info(f"round {self.current_round}: unmasked the weighted sum of {len(survivors)} sites "
                  f"({', '.join(survivors)}); left out: {', '.join(dropped) or 'none'}")
        return FLModel(params=params, params_type=ParamsType.FULL, metrics=_weighted_metrics(metrics, current.weights),
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
