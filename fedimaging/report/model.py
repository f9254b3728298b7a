"""Typed data of the cross-site validation report and its JSON form (``report.json``).

The JSON schema is documented field by field in ``docs/report_schema.md``. Additive changes (a new
field, a new list entry kind) keep ``SCHEMA_VERSION``. Renaming or removing a field, or changing
a field's meaning or type, bumps it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1

GLOBAL_FINAL_MODEL = "SRV_FL_global_model.pt"
GLOBAL_BEST_MODEL = "SRV_best_FL_global_model.pt"

# Model kinds. "global_other" is any other server model (a name starting with "SRV_").
GLOBAL_FINAL = "global_final"
GLOBAL_BEST = "global_best"
GLOBAL_OTHER = "global_other"
LOCAL = "local"
GLOBAL_KINDS = (GLOBAL_FINAL, GLOBAL_BEST)

# Cell and site statuses.
OK = "ok"
FAILED = "failed"
MISSING = "missing"
SMALL_SAMPLE = "small_sample"
# The site says the metric does not apply there (e.g. an optional class it does not annotate).
NOT_APPLICABLE = "not_applicable"
USABLE_STATUSES = (OK, SMALL_SAMPLE)

SMALL_SAMPLE_CASES = 5
SMALL_SAMPLE_REASON = "fewer than 5 cases: no interval"

# NOTE: the rule takes higher values as better, which holds for the contract's metrics (Dice, accuracy,
# balanced accuracy, AUC). The metrics contract carries no direction, so a lower-is-better primary
# metric (a distance or a loss) would be ranked the wrong way round.
BEST_GLOBAL_RULE = (
    "The best global model is the global model ({final} or {best}) with the highest case-weighted mean "
    "of the primary metric ({metric}) over the sites that validated it. Each site's value is weighted by "
    "its number of cases n for that metric. Small-sample cells count, and failed or missing cells do not. "
    "Higher values are taken as better, and a tie goes to the final model."
)


@dataclass
class Cell:
    """One (model, validating site, metric) result."""

    model: str
    model_kind: str
    site: str
    metric: str | None
    value: float | None
    n: int | None
    interval: list[float] | None
    status: str
    reason: str | None

    @property
    def usable(self) -> bool:
        return self.status in USABLE_STATUSES


@dataclass
class SiteSummary:
    """Validation status of one site, over all models it validated."""

    site: str
    status: str
    reason: str | None
    n_cases: int | None
    n_patients: int | None
    manifest_sha256: str | None


@dataclass
class ModelSummary:
    """One model with the case-weighted mean of the primary metric over the sites that validated it."""

    model: str
    kind: str
    owner_site: str | None
    primary_metric: str | None
    weighted_mean: float | None
    n_total: int
    sites_used: list[str]
    sites_not_used: list[str]
    weighted_mean_other_sites: float | None = None
    n_other_sites: int | None = None


@dataclass
class BestGlobalModel:
    """The global model chosen by ``rule``, or ``model`` None with a ``reason``."""

    rule: str
    primary_metric: str | None
    model: str | None
    model_kind: str | None
    weighted_mean: float | None
    n_total: int | None
    sites_used: list[str]
    nvflare_best_model: str | None
    agrees_with_nvflare_best: bool | None
    reason: str | None


@dataclass
class SiteProvenance:
    """Software versions, data hashes and seed that one site reported with its results."""

    site: str
    versions: dict[str, str | None]
    manifest_sha256: str | None
    site_config_sha256: str | None
    seed: int | None


@dataclass
class Provenance:
    generated_at: str
    report_fedimaging_version: str
    results_file: str
    results_sha256: str
    run_file: str | None
    job_config_sha256: str | None
    job_config_source: str | None
    sites: list[SiteProvenance] = field(default_factory=list)


@dataclass
class RunSummary:
    job_name: str | None
    rounds: int | None
    seed: int | None
    expected_sites: list[str]
    expected_sites_source: str
    task: str | None
    primary_metric: str | None
    metrics: list[str]


@dataclass
class Report:
    run: RunSummary
    cells: list[Cell]
    sites: list[SiteSummary]
    models: list[ModelSummary]
    best_global_model: BestGlobalModel
    provenance: Provenance
    notes: list[str]

    @property
    def site_names(self) -> list[str]:
        """Site columns: the expected sites, then any other site that sent results."""
        return [site.site for site in self.sites]

    @property
    def usable_cell_count(self) -> int:
        return sum(1 for cell in self.cells if cell.usable)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "run": asdict(self.run),
            "cells": [asdict(cell) for cell in self.cells],
            "sites": [asdict(site) for site in self.sites],
            "models": [asdict(model) for model in self.models],
            "best_global_model": asdict(self.best_global_model),
            "provenance": asdict(self.provenance),
            "notes": list(self.notes),
        }
