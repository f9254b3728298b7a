"""Test-only NVFlare server component: records what the server received and what it aggregated.

A test copies this file into a job's ``custom/`` folder and adds the component to the server
configuration; it writes ``<folder>/received/<site>_<round>.npy`` (each masked vector exactly as it
arrived) and ``<folder>/aggregate_<round>.npz`` (the new global model).
"""

from pathlib import Path

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils


def _numpy(value):
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


class SecAggRecorder(FLComponent):
    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def handle_event(self, event_type: str, fl_ctx):
        root = Path(self.folder)
        if event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
            if result is None:
                return
            model = FLModelUtils.from_shareable(result)
            masked = (model.params or {}).get("secagg_masked")
            if masked is None:
                return
            site = fl_ctx.get_peer_context().get_identity_name()
            round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            (root / "received").mkdir(parents=True, exist_ok=True)
            np.save(root / "received" / f"{site}_{round_number}.npy", _numpy(masked))
        elif event_type == AppEventType.AFTER_AGGREGATION:
            aggregate = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
            round_number = (aggregate.meta or {}).get("current_round")
            root.mkdir(parents=True, exist_ok=True)
            np.savez(root / f"aggregate_{round_number}.npz", **{k: _numpy(v) for k, v in aggregate.params.items()})
        elif event_type == EventType.END_RUN:
            root.mkdir(parents=True, exist_ok=True)
            (root / "ended").write_text("ok\n")
