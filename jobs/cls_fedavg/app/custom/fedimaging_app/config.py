"""Job and site configuration, validated once when a client starts.

The job configuration (``fedimaging_job.json``) travels inside the job and is the same at every site.
The site configuration (YAML) stays at the site: data folder, label mapping, device. The client script
finds it without the job naming any site path (see ``locate_site_config``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SITE_CONFIG_ENV = "FEDIMAGING_SITE_CONFIG"
SITE_CONFIG_MAP_ENV = "FEDIMAGING_SITE_CONFIG_MAP"
SITE_CONFIG_FILE_NAME = "fedimaging_site.yaml"
JOB_CONFIG_FILE_NAME = "fedimaging_job.json"


class ConfigError(ValueError):
    """A job or site configuration that cannot be used; the message names the file, field and fix."""


class ModelSpec(BaseModel):
    """Network architecture and its size."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["unet", "segresnet", "densenet121", "resnet18", "resnet10"]
    channels: list[int] = Field(default_factory=lambda: [8, 16, 32, 64])
    image_size: int | None = None  # classification: tiles are resized to this many pixels
    # Segmentation UNet normalisation layers. Batch norm lets a job keep norm layers local (FedBN) through
    # an exclude_vars privacy filter.
    norm: Literal["instance", "batch"] = "instance"


class AggregationSpec(BaseModel):
    """How the server combines the sites' replies, and the clipping sites apply before sending."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["weighted_mean", "median", "trimmed_mean"] = "weighted_mean"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    # Fewer valid replies than this fail the round.
    min_valid_replies: int = Field(2, ge=1)
    # Sites scale their update (weights minus the received global model) to at most this L2 norm.
    max_update_norm: float | None = Field(None, gt=0)


class PrivacySpec(BaseModel):
    """Client-level differential privacy (DP-FedAvg) applied at every site."""

    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float = Field(gt=0)
    clip_norm: float = Field(gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class PrivacyFilterSpec(BaseModel):
    """One of NVFlare's privacy filters, applied at every site to the update it sends after training."""

    model_config = ConfigDict(extra="forbid")

    # percentile: PercentilePrivacy (share only the largest changes, clipped); svt: SVTPrivacy (sparse
    # vector technique); exclude_vars: ExcludeVars (named parameters never leave the site and stay local).
    name: Literal["percentile", "svt", "exclude_vars"]
    args: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exclude_vars_listed(self) -> "PrivacyFilterSpec":
        if self.name == "exclude_vars":
            names = self.args.get("exclude_vars")
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError("exclude_vars needs args.exclude_vars: a list of parameter names (regular expressions "
                                 "are not exported correctly by NVFlare)")
        return self


class SecureAggregationSpec(BaseModel):
    """Pairwise-masking secure aggregation (``fedimaging_app.secagg``): the server sees only masked updates."""

    model_config = ConfigDict(extra="forbid")

    # Limit for the key exchange, share relay and unmask tasks (training uses timeouts.train_s).
    phase_timeout_s: int = Field(300, ge=1)


class HESpec(BaseModel):
    """NVFlare's homomorphic encryption (TenSEAL CKKS): sites encrypt their weights, the server adds ciphertexts.

    Deployments only: the TenSEAL contexts come from provisioning with NVFlare's HE builder, which the
    simulator lacks. The global model stays encrypted at the server; a site decrypts it with
    ``fedimaging he-decrypt``. See docs/homomorphic_encryption.md for the model-size limit.
    """

    model_config = ConfigDict(extra="forbid")


class TimeoutSpec(BaseModel):
    """How long the server waits for sites; a site that has not answered by then is left out."""

    model_config = ConfigDict(extra="forbid")

    # One round's training at every site; the round goes on with the sites that answered, when they
    # are at least aggregation.min_valid_replies. Raise it for sites whose rounds take longer.
    train_s: int = Field(3600, ge=1)
    # Cross-site evaluation: validating one model at a site, and a site sending its local model.
    validation_s: int = Field(1800, ge=1)
    submit_model_s: int = Field(600, ge=1)


class JobConfig(BaseModel):
    """Everything about training that is the same at every site."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["segmentation", "classification"]
    classes: dict[str, Literal["required", "optional"]]
    model: ModelSpec
    epochs_per_round: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(2, ge=1)
    seed: int = 0
    fedprox_mu: float = Field(0.0, ge=0)
    # When set, each round trains exactly this many steps, cycling through the site's cases, instead of
    # epochs_per_round passes (sites with one or two cases would otherwise take one or two steps).
    steps_per_round: int | None = Field(None, ge=1)
    bootstrap_samples: int = Field(1000, ge=100)
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    differential_privacy: PrivacySpec | None = None
    secure_aggregation: SecureAggregationSpec | None = None
    # NVFlare's HE workflow instead of FedAvg (deployments only); no cross-site evaluation in the job.
    homomorphic_encryption: HESpec | None = None
    timeouts: TimeoutSpec = Field(default_factory=TimeoutSpec)
    # NVFlare privacy filters on each site's training result; sites then send weight differences.
    privacy_filters: list[PrivacyFilterSpec] = Field(default_factory=list)
    # Models scored by cross-site evaluation: "global_and_local" also sends each site's local model to
    # the others; "global" scores the global models only. Default: global_and_local, or global when
    # masking or differential privacy is on (a local model is neither masked nor private).
    cross_site_models: Literal["global_and_local", "global"] | None = None
    # Segmentation only.
    patch_size: list[int] = Field(default_factory=lambda: [64, 64, 32])
    spacing_mm: list[float] | None = None
    intensity_window: list[float] = Field(default_factory=lambda: [-200.0, 400.0])
    samples_per_volume: int = Field(2, ge=1)
    positive_fraction: float = Field(0.67, ge=0, le=1)

    @field_validator("classes")
    @classmethod
    def _classes_present(cls, value: dict) -> dict:
        if not value:
            raise ValueError("at least one class is needed")
        if "background" in value:
            raise ValueError("'background' is implicit (label 0) and must not be listed")
        return value

    @model_validator(mode="after")
    def _task_fields(self) -> "JobConfig":
        if self.task == "segmentation":
            if len(self.patch_size) != 3:
                raise ValueError("patch_size needs three values (x, y, z) for segmentation")
            if len(self.intensity_window) != 2 or self.intensity_window[0] >= self.intensity_window[1]:
                raise ValueError("intensity_window needs [low, high] with low < high")
        elif len(self.classes) < 2:
            raise ValueError("classification needs at least two classes")
        if self.differential_privacy is not None and self.aggregation.method != "weighted_mean":
            raise ValueError("differential_privacy is calibrated for FedAvg (aggregation.method weighted_mean); "
                             "median and trimmed mean change its sensitivity")
        if self.secure_aggregation is not None and self.aggregation.method != "weighted_mean":
            raise ValueError(f"aggregation.method {self.aggregation.method} cannot be combined with "
                             "secure_aggregation: the server only ever sees the masked sum, so it cannot take a "
                             "coordinate-wise median or trimmed mean; use weighted_mean")
        if self.privacy_filters and (self.secure_aggregation is not None or self.differential_privacy is not None):
            raise ValueError("privacy_filters cannot be combined with secure_aggregation or differential_privacy: the "
                             "filters would act on masked or already-noised updates; choose one protection")
        if len({f.name for f in self.privacy_filters}) != len(self.privacy_filters):
            raise ValueError("privacy_filters lists the same filter twice")
        if self.homomorphic_encryption is not None:
            self._check_homomorphic_encryption()
        protected = [name for name, on in (("secure_aggregation", self.secure_aggregation is not None),
                                           ("differential_privacy", self.differential_privacy is not None)) if on]
        if protected and self.cross_site_models == "global_and_local":
            raise ValueError(f"cross_site_models global_and_local cannot be combined with {' and '.join(protected)}: "
                             "it would send each site's unprotected local model to the other sites; "
                             "use global (or leave cross_site_models out)")
        return self

    def _check_homomorphic_encryption(self) -> None:
        if self.secure_aggregation is not None:
            raise ValueError("homomorphic_encryption cannot be combined with secure_aggregation: both hide single "
                             "updates from the server in different ways and NVFlare's HE workflow replaces the "
                             "masking workflow; choose one")
        if self.aggregation.method != "weighted_mean":
            raise ValueError(f"aggregation.method {self.aggregation.method} cannot be combined with "
                             "homomorphic_encryption: the server can only add encrypted updates, not sort them for "
                             "a median or trimmed mean; use weighted_mean")
        if self.privacy_filters:
            raise ValueError("privacy_filters cannot be combined with homomorphic_encryption: NVFlare's filters "
                             "send partial weight differences, which its HE aggregator cannot add to the encrypted "
                             "global model; remove privacy_filters")
        if self.cross_site_models is not None:
            raise ValueError("cross_site_models cannot be set with homomorphic_encryption: NVFlare has no cross-site "
                             "evaluation for HE jobs; evaluate the decrypted global model with the evaluation job "
                             "that fedimaging he-decrypt writes (docs/homomorphic_encryption.md)")

    @property
    def sends_differences(self) -> bool:
        """Whether sites send weight differences (needed by NVFlare's privacy filters) instead of weights."""
        return bool(self.privacy_filters)

    @property
    def kept_local(self) -> list[str]:
        """Parameter names an exclude_vars filter keeps at the sites."""
        return [n for f in self.privacy_filters if f.name == "exclude_vars" for n in f.args["exclude_vars"]]

    @property
    def evaluates_local_models(self) -> bool:
        """Whether cross-site evaluation asks sites for their local models (NVFlare's submit_model task)."""
        if self.cross_site_models is not None:
            return self.cross_site_models == "global_and_local"
        return (self.secure_aggregation is None and self.differential_privacy is None
                and self.homomorphic_encryption is None)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)


class ClassSource(BaseModel):
    """Source of one job class in a site's prepared data (exactly one field set)."""

    model_config = ConfigDict(extra="forbid")

    label_value: int | list[int] | None = None  # segmentation: value(s) in the label map
    mask: str | None = None  # segmentation: name of a per-structure mask file
    segment: str | None = None  # segmentation: DICOM SEG segment name (its number is looked up)
    local_classes: list[str] | None = None  # classification: local class names
    all_other_classes: bool = False  # classification: every local class not mapped elsewhere

    @model_validator(mode="after")
    def _exactly_one(self) -> "ClassSource":
        chosen = [name for name in ("label_value", "mask", "segment", "local_classes") if getattr(self, name) is not None]
        if self.all_other_classes:
            chosen.append("all_other_classes")
        if len(chosen) != 1:
            raise ValueError(
                "give exactly one of label_value, mask, segment, local_classes or all_other_classes "
                f"(got {', '.join(chosen) or 'none'})"
            )
        return self


class SiteConfig(BaseModel):
    """Settings of one site; the file stays at the site."""

    model_config = ConfigDict(extra="forbid")

    site_name: str
    data_dir: Path
    label_mapping: dict[str, ClassSource]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    # With a single case, train and validate on it (a functional test, not evidence of quality).
    validate_on_training_when_no_validation: bool = True
    # The site's NVFlare startup kit (the folder holding startup/); used by `fedimaging site check`.
    startup_kit: Path | None = None
    # The pseudonym key fedimaging prepare used; the PHI guard needs it to check outgoing messages
    # (default: $FEDIMAGING_KEY_FILE, else the key file named in the prepared folder).
    key_file: Path | None = None


def _format_validation_error(path: Path, error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"field '{field}': {item['msg']}")
    return f"{path}: invalid configuration: " + "; ".join(parts)


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate a site YAML file; a relative ``data_dir`` is relative to the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read site configuration ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with site_name, data_dir and label_mapping")
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from exc
    if not config.data_dir.is_absolute():
        config.data_dir = (path.parent / config.data_dir).resolve()
    for name in ("startup_kit", "key_file"):
        value = getattr(config, name)
        if value is not None and not value.expanduser().is_absolute():
            setattr(config, name, (path.parent / value).resolve())
    return config


def load_job_config(path: Path) -> JobConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return JobConfig.model_validate(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job configuration ({exc})") from exc
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from exc


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def locate_site_config(site_name: str, start: Path | None = None) -> Path:
    """Find this site's configuration file.

    Order: ``$FEDIMAGING_SITE_CONFIG`` (one file); ``$FEDIMAGING_SITE_CONFIG_MAP`` (a JSON file
    mapping site names to files, written by ``fedimaging simulate``); ``local/fedimaging_site.yaml``
    in the site's NVFlare workspace, searched from the working directory upwards.
    """
    explicit = os.environ.get(SITE_CONFIG_ENV)
    if explicit:
        return Path(explicit)
    mapping_file = os.environ.get(SITE_CONFIG_MAP_ENV)
    if mapping_file:
        mapping = json.loads(Path(mapping_file).read_text())
        if site_name in mapping:
            return Path(mapping[site_name])
        raise ConfigError(f"{mapping_file} maps no configuration for site '{site_name}'; sites mapped: {sorted(mapping)}")
    here = Path(start or Path.cwd()).resolve()
    for folder in [here, *here.parents][:5]:
        candidate = folder / "local" / SITE_CONFIG_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no site configuration found for site '{site_name}': put it in the site's NVFlare workspace as "
        f"local/{SITE_CONFIG_FILE_NAME}, or set {SITE_CONFIG_ENV} to its path"
    )
