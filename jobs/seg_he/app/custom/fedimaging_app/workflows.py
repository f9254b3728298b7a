"""FedAvg that stops waiting for sites that do not reply (server side; no torch import).

NVFlare's FedAvg controller sends each round's training task without a timeout and waits for every
site, so one site that stops stalls the job for ever. ``TimedFedAvg`` waits at most ``train_timeout``
seconds and goes on with the replies that arrived; the aggregator then fails the round when fewer
than its minimum are valid (``CheckedAggregator``'s ``min_clients``). The sites that did not answer
are logged and named in the aggregate's metadata.
"""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg


class TimedFedAvg(FedAvg):
    """NVFlare's FedAvg with a training timeout.

    A round ends when every site has replied or ``train_timeout`` seconds have passed, whichever comes
    first. ``min_clients`` is the fewest replies the controller accepts; the aggregator's own minimum
    decides whether the round's replies are enough.
    """

    def __init__(self, *args, train_timeout: int = 3600, min_clients: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_timeout = int(train_timeout)
        self.min_clients = int(min_clients)
        self._targets: list[str] = []
        self._answered: set[str] = set()

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        if task_name != self.task_name:
            return super().send_model(task_name=task_name, data=data, targets=targets, min_responses=min_responses,
                                      timeout=timeout, callback=callback)
        self._targets = list(targets or [])
        self._answered = set()

        def note_and_forward(result):
            self._answered.add(str((result.meta or {}).get("client_name", "")))
            return callback(result) if callback else None

        self.broadcast_model(task_name=task_name, data=data, targets=targets,
                             min_responses=min(self.min_clients, len(self._targets)) or None,
                             timeout=self.train_timeout, wait_time_after_min_received=self.train_timeout,
                             blocking=False, callback=note_and_forward)

    def _get_aggregated_result(self):
        silent = sorted(set(self._targets) - self._answered)
        if silent:
            self.warning(f"round {self.current_round}: no training result from {', '.join(silent)} within "
                         f"{self.train_timeout} s; aggregating the {len(self._answered)} sites that answered")
        result = super()._get_aggregated_result()
        if silent:
            excluded = dict((result.meta or {}).get("fedimaging_excluded_sites") or {})
            excluded.update({site: [f"no training result within {self.train_timeout} s"] for site in silent})
            result.meta["fedimaging_excluded_sites"] = excluded
        return result
