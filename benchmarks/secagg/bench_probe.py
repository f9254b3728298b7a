"""Server-side probes for the benchmark: round start times and the size of every message per site."""

import json
import time
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.app_event_type import AppEventType
from nvflare.fuel.utils import fobs


class RoundTimer(FLComponent):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.starts = []

    def handle_event(self, event_type, fl_ctx):
        if event_type == AppEventType.ROUND_STARTED:
            self.starts.append(time.monotonic())
        elif event_type == AppEventType.AFTER_AGGREGATION:
            self.starts.append(-time.monotonic())  # negative: a round's aggregation finished
        elif event_type == EventType.END_RUN:
            Path(self.path).write_text(json.dumps(self.starts))


class ByteCounter(Filter):
    """Adds the serialized size of each message to ``<path>`` lines: direction, task, site, bytes."""

    def __init__(self, path: str, direction: str):
        super().__init__()
        self.path = path
        self.direction = direction

    def process(self, shareable, fl_ctx):
        from nvflare.apis.fl_constant import FLContextKey

        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "?"
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "?")
        size = len(fobs.dumps(shareable))
        with open(self.path, "a") as fh:
            fh.write(f"{self.direction}\t{task}\t{site}\t{size}\n")
        return shareable
