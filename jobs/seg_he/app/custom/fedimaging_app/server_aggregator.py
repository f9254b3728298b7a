"""NVFlare aggregator that checks every site reply before aggregating (server side; numpy and NVFlare only)."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedimaging_app.aggregation import AggregationError, Reply, aggregate

logger = logging.getLogger(__name__)


class CheckedAggregator(ModelAggregator):
    """FedAvg (or median / trimmed mean) over the replies that pass ``fedimaging_app.aggregation`` checks.

    The expected keys and shapes are those most replies agree on (the aggregator never sees the global
    model itself); replies that differ are excluded with the reason logged. Constructor arguments are
    stored under their own names so NVFlare can export the component.
    """

    def __init__(self, method: str = "weighted_mean", trim_fraction: float = 0.1, min_clients: int = 1):
        super().__init__()
        if method not in ("weighted_mean", "median", "trimmed_mean"):
            raise ValueError(f"method '{method}' is not one of weighted_mean, median, trimmed_mean")
        self.method = method
        self.trim_fraction = trim_fraction
        self.min_clients = min_clients
        self._replies: list[Reply] = []
        self._params_types: set = set()
        self.last_verdicts: list = []

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = str(meta.get("client_name") or f"unknown-{len(self._replies)}")
        weight = meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = float("nan")
        params = {name: np.asarray(value) for name, value in (model.params or {}).items()}
        if params:
            # Sites send full weights, or weight differences when the job uses NVFlare's privacy filters.
            self._params_types.add(model.params_type or ParamsType.FULL)
        self._replies.append(Reply(site, params, weight))

    def _reference_shapes(self) -> dict[str, tuple[int, ...]]:
        signatures = Counter(
            tuple(sorted((name.removeprefix("module."), tuple(v.shape)) for name, v in r.params.items()))
            for r in self._replies if r.params)
        if not signatures:
            raise AggregationError("no site sent parameters this round")
        (signature, count), *others = signatures.most_common()
        if others and others[0][1] == count:
            raise AggregationError("sites disagree on the model's keys and shapes and no majority exists; "
                                   "check that every site runs the same job version")
        return dict(signature)

    def aggregate_model(self) -> FLModel:
        try:
            if len(self._params_types) > 1:
                raise AggregationError("sites sent a mix of full weights and weight differences; check that every "
                                       "site runs the same job version")
            params_type = next(iter(self._params_types), ParamsType.FULL)
            shapes = self._reference_shapes()
            params, verdicts = aggregate(self._replies, shapes, method=self.method, trim_fraction=self.trim_fraction,
                                         min_clients=self.min_clients)
        except AggregationError as error:
            logger.error("aggregation failed: %s", error)
            self.reset_stats()
            raise
        for verdict in verdicts:
            if not verdict.accepted:
                logger.warning("excluded the reply of %s from this round: %s", verdict.site, "; ".join(verdict.reasons))
            for note in verdict.notes:
                logger.info("reply of %s: %s", verdict.site, note)
        self.last_verdicts = verdicts
        self.reset_stats()
        excluded = {v.site: v.reasons for v in verdicts if not v.accepted}
        return FLModel(params=params, params_type=params_type,
                       meta={"fedimaging_excluded_sites": excluded})

    def reset_stats(self) -> None:
        self._replies = []
        self._params_types = set()
