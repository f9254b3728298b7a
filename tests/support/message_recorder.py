"""Test-only NVFlare server filter: writes every task result the server receives, serialized, to a folder.

A test copies this file into a job's ``custom/`` folder and lists ``message_recorder.RecordingFilter``
as a server task result filter; each message becomes ``<folder>/<n>_<task>_<site>.bin`` (FOBS bytes,
the same serialization NVFlare sends), so the test can scan exactly what reached the server.
"""

import itertools
from pathlib import Path

from nvflare.apis.filter import Filter
from nvflare.fuel.utils import fobs


class RecordingFilter(Filter):
    _counter = itertools.count()

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def process(self, shareable, fl_ctx):
        from nvflare.apis.fl_constant import FLContextKey

        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "task")
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "unknown"
        (folder / f"{next(self._counter):05d}_{task}_{site}.bin").write_bytes(fobs.dumps(shareable))
        return shareable
