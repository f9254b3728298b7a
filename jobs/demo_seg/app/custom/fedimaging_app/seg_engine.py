"""Local training and validation of the segmentation job at one site."""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference

from fedimaging_app.config import ConfigError, JobConfig, SiteConfig
from fedimaging_app.seg_data import (
    build_items,
    collate_keep_annotated,
    dice_per_class,
    marginal_dice_ce,
    plan_classes,
    training_transform,
    validation_transform,
)
from fedimaging_app.site_data import PreparedData
from fedimaging_app.stats import mean_with_interval, summarize

logger = logging.getLogger(__name__)


class SegmentationEngine:
    """Trains and validates one model at one site; per-case values stay inside this object."""

    primary_metric = "dice_mean"

    def __init__(self, job: JobConfig, site: SiteConfig, data: PreparedData, device: torch.device):
        self.job, self.site, self.device = job, site, device
        self.plans = plan_classes(job, site, data)
        self.train_items = build_items(self.plans, data, data.training)
        validation = data.validation
        self.note = None
        if not validation and site.validate_on_training_when_no_validation:
            validation = data.training
            self.note = (f"no validation cases at this site: the model was validated on its "
                         f"{len(validation)} training case(s), a functional check rather than evidence of generalisation")
        self.val_items = build_items(self.plans, data, validation)
        if not self.train_items:
            raise ConfigError(f"site '{site.site_name}': the prepared datalist has no training cases")
        if not self.val_items:
            raise ConfigError(f"site '{site.site_name}': the prepared datalist has no validation cases")
        self.train_transform = training_transform(job, self.train_items)
        self._global_step = 0
        self._optimizer = None
        self.val_transform = validation_transform(job, self.val_items)

    @property
    def n_training_cases(self) -> int:
        return len(self.train_items)

    def train(self, model: torch.nn.Module, global_model: torch.nn.Module | None, writer, round_number: int) -> float:
        """Train for ``steps_per_round`` steps (or ``epochs_per_round`` passes); return the recent mean loss."""
        loader = DataLoader(Dataset(self.train_items, self.train_transform), batch_size=1, shuffle=True,
                            num_workers=self.site.num_workers, collate_fn=collate_keep_annotated,
                            generator=torch.Generator().manual_seed(self.job.seed + round_number))
        # The optimizer (and its moment estimates) persists across rounds at the site; the global weights
        # are loaded into the same parameters each round.
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(model.parameters(), lr=self.job.learning_rate)
        optimizer = self._optimizer
        proximal = None
        if self.job.fedprox_mu > 0 and global_model is not None:
            from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

            proximal = PTFedProxLoss(mu=self.job.fedprox_mu)
        model.train()
        losses: list[float] = []
        step = 0
        passes = self.job.epochs_per_round if self.job.steps_per_round is None else None
        epoch = 0
        while (passes is not None and epoch < passes) or (passes is None and step < self.job.steps_per_round):
            for batch in loader:
                if passes is None and step >= self.job.steps_per_round:
                    break
                image, label = batch["image"].to(self.device), batch["label"].to(self.device)
                optimizer.zero_grad()
                loss = marginal_dice_ce(model(image), label, batch["annotated"].to(self.device))
                if proximal is not None:
                    loss = loss + proximal(model, global_model)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if writer is not None:
                    writer.add_scalar("train/loss", losses[-1], self._global_step)
                self._global_step += 1
                step += 1
            epoch += 1
        epoch_loss = float(np.mean(losses[-max(1, len(loader)):])) if losses else float("nan")
        return epoch_loss

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict:
        """Mean Dice per class and over classes, with patient-level bootstrap intervals."""
        model.eval()
        n_classes = len(self.job.classes)
        per_case, patients = [], []
        for item in self.val_items:
            sample = self.val_transform(item)
            image = torch.as_tensor(sample["image"])[None].to(self.device)
            logits = sliding_window_inference(image, roi_size=self.job.patch_size, sw_batch_size=1, predictor=model)
            prediction = logits.argmax(dim=1)[0].cpu()
            label = torch.as_tensor(sample["label"])[0]
            dice = dice_per_class(prediction, label, n_classes)
            annotated = sample["annotated"].numpy()[1:]
            dice[~annotated] = np.nan  # an unannotated class is excluded, not scored as background
            per_case.append(dice)
            patients.append(item["patient_id"])
        values = np.array(per_case)
        metrics = {}
        seed = self.job.seed
        for index, name in enumerate(self.job.classes):
            if self.plans[index].source is None:
                metrics[f"dice_{name}"] = summarize(None, 0, None, "not annotated at this site (an optional class "
                                                    "its labels lack)", not_applicable=True)
                continue
            metrics[f"dice_{name}"] = mean_with_interval(values[:, index], patients, self.job.bootstrap_samples, seed)
        with np.errstate(invalid="ignore"):
            case_means = np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=1) if values.size else values
        metrics[self.primary_metric] = mean_with_interval(case_means, patients, self.job.bootstrap_samples, seed)
        return {"metrics": metrics, "n_cases": len(self.val_items), "n_patients": len(set(patients))}
