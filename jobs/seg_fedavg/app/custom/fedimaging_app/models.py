"""Networks used by the jobs, as small wrappers whose attributes mirror their constructor arguments.

NVFlare's job exporter rebuilds a model from its class path and the attributes named like the
constructor arguments, so every argument is stored under its own name.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, SegResNet, UNet, resnet10, resnet18


class SegmentationNet(torch.nn.Module):
    """3D segmentation network with ``out_channels`` = number of job classes + background."""

    def __init__(self, name: str = "unet", out_channels: int = 2, channels: tuple[int, ...] = (8, 16, 32, 64),
                 norm: str = "instance"):
        super().__init__()
        self.name = name
        self.out_channels = out_channels
        self.channels = tuple(channels)
        self.norm = norm
        if norm not in ("instance", "batch"):
            raise ValueError(f"unknown norm '{norm}' for the segmentation model; use 'instance' or 'batch'")
        if name == "unet":
            # Batch norm keeps running statistics, which FedBN-style jobs keep local to each site.
            self.net = UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=self.channels,
                            strides=(2,) * (len(self.channels) - 1), num_res_units=1, norm=norm)
        elif name == "segresnet":
            if norm != "instance":
                raise ValueError(f"norm '{norm}' is only available for the unet model; use norm 'instance' with segresnet")
            self.net = SegResNet(spatial_dims=3, in_channels=1, out_channels=out_channels, init_filters=self.channels[0])
        else:
            raise ValueError(f"unknown segmentation model '{name}'; use 'unet' or 'segresnet'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClassificationNet(torch.nn.Module):
    """2D tile classifier over RGB tiles."""

    def __init__(self, name: str = "resnet18", num_classes: int = 2):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        if name == "densenet121":
            self.net = DenseNet121(spatial_dims=2, in_channels=3, out_channels=num_classes)
        elif name == "resnet18":
            self.net = resnet18(spatial_dims=2, n_input_channels=3, num_classes=num_classes)
        elif name == "resnet10":
            self.net = resnet10(spatial_dims=2, n_input_channels=3, num_classes=num_classes)
        else:
            raise ValueError(f"unknown classification model '{name}'; use 'densenet121', 'resnet18' or 'resnet10'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def model_spec_for_job(job) -> dict:
    """The ``{"class_path", "args"}`` form NVFlare recipes accept, for a validated ``JobConfig``."""
    n_outputs = len(job.classes)
    if job.task == "segmentation":
        return {"class_path": "fedimaging_app.models.SegmentationNet",
                "args": {"name": job.model.name, "out_channels": n_outputs + 1, "channels": list(job.model.channels),
                         "norm": job.model.norm}}
    return {"class_path": "fedimaging_app.models.ClassificationNet",
            "args": {"name": job.model.name, "num_classes": n_outputs}}


def build_model(job) -> torch.nn.Module:
    spec = model_spec_for_job(job)
    cls = SegmentationNet if job.task == "segmentation" else ClassificationNet
    return cls(**spec["args"])
