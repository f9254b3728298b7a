"""Segmentation data: map each site's labels onto the job's classes and build MONAI pipelines.

Class indices: 0 is background, job class i (in the job's order) is i + 1. A case's ``annotated``
vector says which classes it carries; a class a site does not map is unannotated, and the loss
merges it into background instead of teaching the model that it is background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection

from fedimaging_app.config import ClassSource, ConfigError, JobConfig, SiteConfig
from fedimaging_app.site_data import PreparedData, unit_id


@dataclass
class ClassPlan:
    """Reading plan of one job class at this site; ``source`` is None when the site lacks the class."""

    index: int
    name: str
    source: ClassSource | None


def plan_classes(job: JobConfig, site: SiteConfig, data: PreparedData) -> list[ClassPlan]:
    """Check the site's label mapping against the job before training.

    Raises ``ConfigError`` when a required class is not mapped or not found in any training case.
    """
    plans = []
    cases = {case["case_id"]: case for case in data.manifest.get("cases", [])}
    items = data.training + data.validation
    for index, (name, requirement) in enumerate(job.classes.items(), start=1):
        source = site.label_mapping.get(name)
        if source is not None and (source.local_classes is not None or source.all_other_classes):
            raise ConfigError(f"label_mapping.{name}: local_classes/all_other_classes are for classification jobs; "
                              "use label_value, mask or segment")
        if source is None:
            if requirement == "required":
                raise ConfigError(
                    f"site '{site.site_name}' has no label_mapping for the required class '{name}'; "
                    f"add label_mapping.{name} with label_value, mask or segment to the site configuration"
                )
            plans.append(ClassPlan(index, name, None))
            continue
        found = any(_case_has_source(item, cases.get(item.get("case_id"), {}), source) for item in items)
        if not found:
            message = (f"site '{site.site_name}': no prepared case carries the class '{name}' as mapped "
                       f"({source.model_dump(exclude_defaults=True)}); check label_mapping.{name} against the "
                       "label values and mask names in the prepared manifest")
            if requirement == "required":
                raise ConfigError(message)
            source = None
        plans.append(ClassPlan(index, name, source))
    return plans


def _segment_values(case: dict, segment: str) -> list[int]:
    names = case.get("segment_names") or {}
    return [int(number) for number, label in names.items() if label.lower() == segment.lower()]


def _case_has_source(item: dict, case: dict, source: ClassSource) -> bool:
    if source.mask is not None:
        return source.mask in (item.get("masks") or {})
    if "label" not in item:
        return False
    if source.segment is not None:
        return bool(_segment_values(case, source.segment))
    values = source.label_value if isinstance(source.label_value, list) else [source.label_value]
    present = case.get("label_values")
    return present is None or any(v in present for v in values)


def build_items(plans: list[ClassPlan], data: PreparedData, items: list[dict]) -> list[dict]:
    """Datalist items with absolute paths, the files each class needs, and the ``annotated`` vector."""
    cases = {case["case_id"]: case for case in data.manifest.get("cases", [])}
    result = []
    for item in items:
        case = cases.get(item.get("case_id"), {})
        entry = {"image": str(data.root / item["image"]), "case_id": unit_id(item),
                 "patient_id": data.patient_of.get(unit_id(item), unit_id(item))}
        rules = []
        annotated = [True] + [False] * len(plans)
        for plan in plans:
            if plan.source is None or not _case_has_source(item, case, plan.source):
                continue
            annotated[plan.index] = True
            if plan.source.mask is not None:
                key = f"mask_{plan.index}"
                entry[key] = str(data.root / item["masks"][plan.source.mask])
                rules.append((plan.index, key, None))
            else:
                entry["label_map"] = str(data.root / item["label"])
                values = (_segment_values(case, plan.source.segment) if plan.source.segment is not None
                          else plan.source.label_value if isinstance(plan.source.label_value, list)
                          else [plan.source.label_value])
                rules.append((plan.index, "label_map", values))
        entry["annotated"] = torch.tensor(annotated)
        entry["rules"] = rules
        result.append(entry)
    return result


class HarmonizeLabelsd(mt.MapTransform):
    """Build ``label`` (job class indices) from the loaded label map and mask images, then drop them.

    Where mapped structures overlap, the class listed later in the job wins.
    """

    def __init__(self, keys: KeysCollection = ("image",)):
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = d["image"]
        label = torch.zeros_like(image).long()  # keeps the image's affine for the spatial transforms
        for index, key, values in d.pop("rules"):
            source = d[key]
            if values is None:
                label[source > 0] = index
            else:
                label[torch.isin(torch.as_tensor(source).long(), torch.tensor(values))] = index
        for key in [k for k in d if k == "label_map" or k.startswith("mask_")]:
            d.pop(key)
        d["label"] = label
        return d


def _source_keys(items: list[dict]) -> list[str]:
    keys = {k for item in items for k in item if k == "label_map" or k.startswith("mask_")}
    return sorted(keys)


def _spatial(job: JobConfig) -> list:
    steps = [mt.Orientationd(keys=["image", "label"], axcodes="RAS")]
    if job.spacing_mm:
        steps.append(mt.Spacingd(keys=["image", "label"], pixdim=job.spacing_mm, mode=("bilinear", "nearest")))
    low, high = job.intensity_window
    steps.append(mt.ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    steps.append(mt.EnsureTyped(keys=["image", "label"], dtype=(torch.float32, torch.int64), track_meta=False))
    return steps


def training_transform(job: JobConfig, items: list[dict]) -> mt.Compose:
    load_keys = ["image", *_source_keys(items)]
    return mt.Compose([
        mt.LoadImaged(keys=load_keys, image_only=True, ensure_channel_first=True, allow_missing_keys=True),
        HarmonizeLabelsd(),
        *_spatial(job),
        mt.SpatialPadd(keys=["image", "label"], spatial_size=job.patch_size),
        # Crops centre on each foreground class equally often, so small structures (aorta) are seen as
        # often as large ones (liver); positive_fraction of crops centre on foreground.
        mt.RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=job.patch_size,
                                   num_classes=len(job.classes) + 1,
                                   ratios=[1.0 - job.positive_fraction]
                                   + [job.positive_fraction / len(job.classes)] * len(job.classes),
                                   num_samples=job.samples_per_volume, allow_smaller=False, warn=False),
        mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
    ])


def validation_transform(job: JobConfig, items: list[dict]) -> mt.Compose:
    load_keys = ["image", *_source_keys(items)]
    return mt.Compose([
        mt.LoadImaged(keys=load_keys, image_only=True, ensure_channel_first=True, allow_missing_keys=True),
        HarmonizeLabelsd(),
        *_spatial(job),
        mt.SpatialPadd(keys=["image", "label"], spatial_size=job.patch_size),
    ])


def collate_keep_annotated(batch: list[dict]) -> dict:
    """Stack crops into a batch; ``annotated`` becomes (batch, classes + 1)."""
    flat = [sample for entry in batch for sample in (entry if isinstance(entry, list) else [entry])]
    return {
        "image": torch.stack([torch.as_tensor(s["image"]) for s in flat]),
        "label": torch.stack([torch.as_tensor(s["label"]) for s in flat]),
        "annotated": torch.stack([torch.as_tensor(s["annotated"]) for s in flat]),
        "case_id": [s["case_id"] for s in flat],
        "patient_id": [s["patient_id"] for s in flat],
    }


def marginal_dice_ce(logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy where unannotated classes are merged into background (marginal loss).

    ``logits`` (B, C, ...), ``label`` (B, 1, ...) class indices, ``annotated`` (B, C) bool with
    background (index 0) always True. Cross-entropy is averaged over samples; Dice is computed per
    class over every sample that annotates the class (batch Dice), which keeps small structures from
    being pushed to empty predictions by crops that do not contain them.
    """
    probabilities = torch.softmax(logits, dim=1)
    n_classes = logits.shape[1]
    cross_entropy = []
    intersection = torch.zeros(n_classes, device=logits.device)
    denominator = torch.zeros(n_classes, device=logits.device)
    for b in range(logits.shape[0]):
        keep = annotated[b].bool().clone()
        keep[0] = True
        unannotated = probabilities[b, 1:][~keep[1:]].sum(dim=0)
        merged_background = probabilities[b, 0] + unannotated
        reduced = torch.cat([merged_background[None], probabilities[b, 1:][keep[1:]]], dim=0)
        index_map = torch.cumsum(keep.long(), 0) - 1  # old index -> reduced index for annotated classes
        target = index_map[label[b, 0].long()]
        cross_entropy.append(torch.nn.functional.nll_loss(torch.log(reduced.clamp_min(1e-7))[None], target[None]))
        for index in (torch.nonzero(keep[1:]).flatten() + 1).tolist():
            truth = (label[b, 0] == index).float()
            intersection[index] += (probabilities[b, index] * truth).sum()
            denominator[index] += probabilities[b, index].sum() + truth.sum()
    scored = annotated[:, 1:].any(dim=0)
    dice = 1.0 - (2.0 * intersection[1:] + 1e-5) / (denominator[1:] + 1e-5)
    dice_term = dice[scored].mean() if bool(scored.any()) else torch.zeros((), device=logits.device)
    return torch.stack(cross_entropy).mean() + dice_term


def dice_per_class(prediction: torch.Tensor, label: torch.Tensor, n_classes: int) -> np.ndarray:
    """Dice of each job class (1..n_classes) for one case; NaN where the class is absent from both."""
    values = np.full(n_classes, np.nan)
    for index in range(1, n_classes + 1):
        p, t = prediction == index, label == index
        total = int(p.sum()) + int(t.sum())
        if total:
            values[index - 1] = 2.0 * int((p & t).sum()) / total
    return values
