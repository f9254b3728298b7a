"""Server-side probes: the start time of every round and the serialized size of every message per site."""

import json
import time
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.app_event_type import AppEventType
from nvflare.fuel.utils import fobs


class RoundTimer(FLComponent):
    """Writes the round start times (monotonic seconds) to ``path`` when the run ends."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.starts = []

    def handle_event(self, event_type, fl_ctx):
        if event_type == AppEventType.ROUND_STARTED:
            self.starts.append(time.monotonic())
        elif event_type == EventType.END_RUN:
            Path(self.path).write_text(json.dumps(self.starts))


class ByteCounter(Filter):
    """Appends ``direction, task, site, bytes`` lines to ``path`` for each message it sees."""

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
