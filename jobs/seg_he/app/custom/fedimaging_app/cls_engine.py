"""Local training and validation of the tile classification job at one site."""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from torch.utils.data import DataLoader

from fedimaging_app.config import ConfigError, JobConfig, SiteConfig
from fedimaging_app.site_data import PreparedData, unit_id
from fedimaging_app.stats import bootstrap_over_patients, summarize
from fedimaging_app.tiles import WsiTileDataset, tile_loader

logger = logging.getLogger(__name__)

# ImageNet channel statistics, the usual normalisation for H&E tiles fed to CNNs.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def map_local_classes(job: JobConfig, site: SiteConfig, local_classes: set[str]) -> dict[str, int]:
    """Local class name -> job class index; raise ``ConfigError`` for missing required classes."""
    mapping: dict[str, int] = {}
    catch_all = None
    for index, name in enumerate(job.classes):
        source = site.label_mapping.get(name)
        if source is None:
            if job.classes[name] == "required":
                raise ConfigError(f"site '{site.site_name}' has no label_mapping for the required class '{name}'; "
                                  f"add label_mapping.{name} with local_classes or all_other_classes")
            continue
        if source.all_other_classes:
            catch_all = index
            continue
        if source.local_classes is None:
            raise ConfigError(f"label_mapping.{name}: classification jobs map classes with local_classes or "
                              "all_other_classes, not label_value, mask or segment")
        for local in source.local_classes:
            mapping[local] = index
    if catch_all is not None:
        for local in local_classes - set(mapping):
            mapping[local] = catch_all
    for index, name in enumerate(job.classes):
        if job.classes[name] == "required" and index not in {mapping.get(c) for c in local_classes}:
            raise ConfigError(f"site '{site.site_name}': no prepared tile has a local class mapped to the required "
                              f"class '{name}' (local classes: {sorted(local_classes)}); check label_mapping.{name}")
    return mapping


class _LabelledTiles(torch.utils.data.Dataset):
    """Tiles as uint8 (3, H, W) with the site's class index; batches are normalised on the device."""

    def __init__(self, tiles: WsiTileDataset, labels: list[int]):
        self.tiles, self.labels = tiles, labels

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int):
        return self.tiles[index]["image"], self.labels[index]


def normalise_batch(images: torch.Tensor, image_size: int | None, device: torch.device) -> torch.Tensor:
    """Move a uint8 (N, 3, H, W) batch to ``device``, resize it to ``image_size`` and normalise it.

    Worker processes send uint8 tiles, a quarter of the bytes of float32 ones, and the conversion
    runs once per batch on the training device.
    """
    batch = images.to(device).float() / 255.0
    if image_size and batch.shape[-1] != image_size:
        batch = torch.nn.functional.interpolate(batch, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False)
    return (batch - _MEAN.to(device)) / _STD.to(device)


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in range(n_classes) if np.any(truth == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


class ClassificationEngine:
    """Trains and validates a tile classifier at one site; per-tile values stay inside this object."""

    primary_metric = "balanced_accuracy"

    def __init__(self, job: JobConfig, site: SiteConfig, data: PreparedData, device: torch.device):
        self.job, self.site, self.device = job, site, device
        local = {item["class_name"] for item in data.training + data.validation if item.get("class_name")}
        self.mapping = map_local_classes(job, site, local)
        self.note = None
        validation = data.validation
        if not validation and site.validate_on_training_when_no_validation:
            validation = data.training
            self.note = ("no validation tiles at this site: the model was validated on its training "
                         "tiles, a functional check rather than evidence of generalisation")
        self.train_items = [i for i in data.training if i.get("class_name") in self.mapping]
        self.val_items = [i for i in validation if i.get("class_name") in self.mapping]
        if not self.train_items or not self.val_items:
            raise ConfigError(f"site '{site.site_name}': no training or validation tile has a mapped class")
        self.root = data.root
        self.patients = [data.patient_of.get(unit_id(i), unit_id(i)) for i in self.val_items]
        self._global_step = 0
        self._optimizer = None
        self._loaders: dict[str, DataLoader] = {}

    @property
    def n_training_cases(self) -> int:
        return len(self.train_items)

    def _dataset(self, items: list[dict]) -> _LabelledTiles:
        labels = [self.mapping[i["class_name"]] for i in items]
        return _LabelledTiles(WsiTileDataset(items, self.root), labels)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        return normalise_batch(images, self.job.model.image_size, self.device)

    def _loader(self, split: str) -> DataLoader:
        """Return the site's training or validation DataLoader, made on first use and kept for every round.

        With ``num_workers`` set, its worker processes and their open slides persist across rounds
        and epochs instead of starting again each round. Training order comes from one generator
        seeded with the job's seed, so a rerun of the job draws the same order.
        """
        if split not in self._loaders:
            training = split == "train"
            workers = self.site.num_workers
            self._loaders[split] = tile_loader(
                self._dataset(self.train_items if training else self.val_items), self.job.batch_size,
                shuffle=training, num_workers=workers,
                generator=torch.Generator().manual_seed(self.job.seed) if training else None)
        return self._loaders[split]

    def train(self, model: torch.nn.Module, global_model: torch.nn.Module | None, writer, round_number: int) -> float:
        """Train with class-weighted cross-entropy; return the mean loss of the round's last pass."""
        loader = self._loader("train")
        counts = np.bincount(loader.dataset.labels, minlength=len(self.job.classes)).astype(np.float64)
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, np.count_nonzero(counts)), 0.0)
        criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=self.device))
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
        step, epoch = 0, 0
        limit = self.job.steps_per_round
        while (limit is None and epoch < self.job.epochs_per_round) or (limit is not None and step < limit):
            for images, labels in loader:
                if limit is not None and step >= limit:
                    break
                optimizer.zero_grad()
                loss = criterion(model(self._inputs(images)), labels.to(self.device))
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
        return float(np.mean(losses[-max(1, len(loader)):])) if losses else float("nan")

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict:
        """Accuracy, balanced accuracy and one-vs-rest AUC, with patient-level bootstrap intervals."""
        model.eval()
        loader = self._loader("validation")
        probabilities, truth = [], []
        for images, labels in loader:
            probabilities.append(torch.softmax(model(self._inputs(images)), dim=1).cpu())
            truth.append(labels)
        p = torch.cat(probabilities).numpy()
        t = torch.cat(truth).numpy()
        n_classes = len(self.job.classes)
        predicted = p.argmax(axis=1)

        def auc(indices: np.ndarray) -> float:
            present = np.unique(t[indices])
            if present.size < 2:
                return float("nan")
            one_hot = np.eye(n_classes)[t[indices]][:, present]
            scores = p[indices][:, present]
            return float(compute_roc_auc(torch.tensor(scores), torch.tensor(one_hot), average="macro"))

        statistics = {
            "accuracy": lambda idx: float(np.mean(predicted[idx] == t[idx])),
            "balanced_accuracy": lambda idx: balanced_accuracy(t[idx], predicted[idx], n_classes),
            "auc_ovr": auc,
        }
        everything = np.arange(len(t))
        metrics = {}
        for name, statistic in statistics.items():
            interval = None
            if len(t) >= 5:
                interval = bootstrap_over_patients(self.patients, statistic, self.job.bootstrap_samples, self.job.seed)
            reason = "only one class among the validation tiles, so it is undefined" if name == "auc_ovr" else None
            metrics[name] = summarize(statistic(everything), len(t), interval, reason)
        return {"metrics": metrics, "n_cases": len(t), "n_patients": len(set(self.patients))}
