"""Build the report data from the inputs: one cell per (model, site, metric), site and model
summaries, the best global model by the stated rule, provenance and notes."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fedimaging import __version__
from fedimaging.report.load import ReportInputs
from fedimaging.report.metrics import VERSION_KEYS, ValidationResult, parse_result
from fedimaging.report.model import (
    BEST_GLOBAL_RULE, FAILED, GLOBAL_BEST, GLOBAL_BEST_MODEL, GLOBAL_FINAL, GLOBAL_FINAL_MODEL, GLOBAL_KINDS,
    GLOBAL_OTHER, LOCAL, MISSING, NOT_APPLICABLE, OK, SMALL_SAMPLE, SMALL_SAMPLE_REASON, BestGlobalModel, Cell, ModelSummary,
    Provenance, Report, RunSummary, SiteProvenance, SiteSummary,
)

SERVER_MODEL_PREFIX = "SRV_"


@dataclass
class _Row:
    model: str
    kind: str
    owner_site: str | None


def natural_key(name: str) -> list:
    """Sort key that puts site-2 before site-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def model_kind(name: str) -> str:
    if name == GLOBAL_FINAL_MODEL:
        return GLOBAL_FINAL
    if name == GLOBAL_BEST_MODEL:
        return GLOBAL_BEST
    if name.startswith(SERVER_MODEL_PREFIX):
        return GLOBAL_OTHER
    return LOCAL


def build_report(inputs: ReportInputs, generated_at: datetime | None = None) -> Report:
    notes: list[str] = []
    validators, broken_sites = _results_table(inputs, notes)
    notes.extend(inputs.run.problems)

    expected, sites_source, sites = _site_columns(inputs, validators, notes)
    rows = _model_rows(validators, sites)
    parsed = {
        (site, model): parse_result(raw) for site, entries in validators.items() for model, raw in entries.items()
    }
    contract_results = [result for result in parsed.values() if result.follows_contract]
    primary_metric, task = _primary_metric(contract_results, notes)
    metric_names = _metric_names(contract_results, primary_metric)

    cells = []
    for row in rows:
        for site in sites:
            for metric in metric_names:
                cells.append(_cell(row, site, metric, validators, broken_sites, parsed, inputs.run.site_problems))

    site_summaries = [_site_summary(site, rows, validators, broken_sites, parsed, inputs.run.site_problems) for site in sites]
    model_summaries = [_model_summary(row, cells, sites, primary_metric) for row in rows]
    best = _best_global(model_summaries, primary_metric, notes)
    provenance = _provenance(inputs, sites, rows, parsed, generated_at, notes)
    _add_result_notes(sites, rows, parsed, inputs.run.site_problems, validators, notes)
    notes.extend(_protection_notes(inputs.job_config.data if inputs.job_config is not None else None))
    lacking = sorted({cell.site for cell in cells if cell.status == NOT_APPLICABLE})
    if lacking and primary_metric == "dice_mean":
        notes.append(f"dice_mean averages the classes each site annotates, so at {', '.join(lacking)} it covers "
                     "fewer classes than elsewhere; compare the per-class metrics too.")

    run = RunSummary(
        job_name=inputs.run.job_name or _job_name_from_layout(inputs.results.relpath),
        rounds=inputs.run.rounds,
        seed=inputs.run.seed,
        expected_sites=expected,
        expected_sites_source=sites_source,
        task=task,
        primary_metric=primary_metric,
        metrics=[name for name in metric_names if name is not None],
    )
    report = Report(run=run, cells=cells, sites=site_summaries, models=model_summaries, best_global_model=best,
                    provenance=provenance, notes=list(dict.fromkeys(notes)))
    if report.usable_cell_count == 0:
        report.notes.append("No cell holds a usable value: every validation failed or is missing (see the reasons).")
    return report


def _results_table(inputs: ReportInputs, notes: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Return ``{site: {model: raw result}}`` and the sites whose entry is not an object, with a reason."""
    results = inputs.results
    if results.error:
        notes.append(f"{results.error}. No result could be read.")
        return {}, {}
    if not isinstance(results.data, dict):
        notes.append(f"{results.relpath} is not a JSON object of validating sites. No result could be read.")
        return {}, {}

    if not results.data:
        notes.append(f"{results.relpath} contains no validation results.")
    validators: dict[str, dict[str, Any]] = {}
    broken: dict[str, str] = {}
    for site, entries in results.data.items():
        if isinstance(entries, dict):
            validators[str(site)] = {str(model): raw for model, raw in entries.items()}
        else:
            broken[str(site)] = "the site's entry in cross_val_results.json is not an object of model results"
    return validators, broken


def _site_columns(inputs: ReportInputs, validators: dict, notes: list[str]) -> tuple[list[str], str, list[str]]:
    """Return the expected sites, where they came from, and the site columns of the report.

    The columns are the expected sites followed by any other site that sent results.
    """
    local_models = {model for entries in validators.values() for model in entries if model_kind(model) == LOCAL}
    reported = set(validators) | {site for site in inputs.run.site_problems}
    expected = inputs.run.expected_sites
    if not expected:
        seen = sorted(reported | local_models, key=natural_key)
        return seen, "results", seen

    extra = sorted(set(validators) - set(expected), key=natural_key)
    if extra:
        notes.append(f"Sites not listed in expected_sites sent validation results: {', '.join(extra)}.")
    return list(expected), "run_file", list(expected) + extra


def _model_rows(validators: dict[str, dict[str, Any]], sites: list[str]) -> list[_Row]:
    names = list(dict.fromkeys(model for entries in validators.values() for model in entries))
    globals_other = sorted((name for name in names if model_kind(name) == GLOBAL_OTHER), key=natural_key)
    locals_seen = [name for name in names if model_kind(name) == LOCAL]

    rows = [_Row(GLOBAL_FINAL_MODEL, GLOBAL_FINAL, None)]
    if GLOBAL_BEST_MODEL in names:
        rows.append(_Row(GLOBAL_BEST_MODEL, GLOBAL_BEST, None))
    rows.extend(_Row(name, GLOBAL_OTHER, None) for name in globals_other)
    if locals_seen:
        # Every site gets a local-model row once any local model was validated, so that a site whose
        # local model is absent shows as missing instead of disappearing.
        extra = sorted((name for name in locals_seen if name not in sites), key=natural_key)
        rows.extend(_Row(site, LOCAL, site) for site in [*sites, *extra])
    return rows


def _primary_metric(results: list[ValidationResult], notes: list[str]) -> tuple[str | None, str | None]:
    primaries = Counter(result.primary_metric for result in results if result.primary_metric)
    tasks = Counter(result.task for result in results if result.task)
    primary = primaries.most_common(1)[0][0] if primaries else None
    task = tasks.most_common(1)[0][0] if tasks else None
    if results and not primaries:
        notes.append("No result names a primary_metric, so the report computes no model means and no best global model.")
    if len(primaries) > 1:
        notes.append(f"Results name different primary metrics ({', '.join(sorted(primaries))}); "
                     f"the report uses the most frequent one, {primary}.")
    if len(tasks) > 1:
        notes.append(f"Results name different tasks ({', '.join(sorted(tasks))}).")
    return primary, task


def _metric_names(results: list[ValidationResult], primary: str | None) -> list[str | None]:
    others = {name for result in results for name in result.metrics if name != primary}
    names: list[str | None] = ([primary] if primary else []) + sorted(others)
    # With no metric name anywhere, one cell per (model, site) with metric None still records why.
    return names or [None]


def _missing_site_reason(site: str, broken_sites: dict[str, str], site_problems: dict[str, str]) -> str:
    if site in site_problems:
        return site_problems[site]
    if site in broken_sites:
        return broken_sites[site]
    return "the site sent no validation results"


def _cell(row: _Row, site: str, metric: str | None, validators, broken_sites, parsed, site_problems) -> Cell:
    def unusable(status: str, reason: str) -> Cell:
        return Cell(row.model, row.kind, site, metric, None, None, None, status, reason)

    if site not in validators or not validators[site]:
        return unusable(MISSING, _missing_site_reason(site, broken_sites, site_problems))
    result = parsed.get((site, row.model))
    if result is None:
        if not any(row.model in entries for entries in validators.values()):
            return unusable(MISSING, "no site returned a result for this model")
        return unusable(MISSING, "the site returned no result for this model")
    if result.status != OK:
        return unusable(result.status, result.reason or "validation failed")
    entry = result.metrics.get(metric) if metric is not None else None
    if entry is None:
        return unusable(MISSING, "the site did not report this metric")
    if entry.not_applicable:
        return unusable(NOT_APPLICABLE, entry.problem or "the metric does not apply at this site")
    if entry.problem:
        return unusable(FAILED, entry.problem)

    status, reason = OK, entry.interval_problem
    if entry.small_sample:
        status, reason = SMALL_SAMPLE, SMALL_SAMPLE_REASON
    elif entry.interval is None and reason is None:
        reason = ("the site reported no interval (a patient-level bootstrap needs cases from at least "
                  "2 patients)")
    return Cell(row.model, row.kind, site, metric, entry.value, entry.n, entry.interval, status, reason)


def _site_summary(site: str, rows, validators, broken_sites, parsed, site_problems) -> SiteSummary:
    if site not in validators:
        return SiteSummary(site, MISSING, _missing_site_reason(site, broken_sites, site_problems), None, None, None)
    if not validators[site]:
        return SiteSummary(site, MISSING, "the site is listed in cross_val_results.json with no results", None, None, None)

    results = [parsed[(site, row.model)] for row in rows if (site, row.model) in parsed]
    ok_results = [result for result in results if result.status == OK]
    described = next((result for result in ok_results + results if result.follows_contract), None)
    n_cases = described.n_cases if described else None
    n_patients = described.n_patients if described else None
    manifest = described.manifest_sha256 if described else None
    if ok_results:
        # Count only models that some site validated, so a model that never existed is not held against this site.
        validated = sum(1 for row in rows if any(row.model in entries for entries in validators.values()))
        failed = sum(1 for result in results if result.status != OK)
        missing = validated - len(results)
        problems = []
        if failed:
            problems.append(f"validation failed for {failed} of {validated} models")
        if missing:
            problems.append(f"no result for {missing} of {validated} models")
        return SiteSummary(site, OK, "; ".join(problems) or None, n_cases, n_patients, manifest)
    reasons = list(dict.fromkeys(result.reason or "validation failed" for result in results))
    return SiteSummary(site, FAILED, "; ".join(reasons) or "no usable result", n_cases, n_patients, manifest)


def _weighted_mean(cells: list[Cell]) -> tuple[float | None, int]:
    total = sum(cell.n for cell in cells)
    if total == 0:
        return None, 0
    return sum(cell.value * cell.n for cell in cells) / total, total


def _model_summary(row: _Row, cells: list[Cell], sites: list[str], primary: str | None) -> ModelSummary:
    # With no primary metric, the cells with metric None still tell which sites failed or are missing.
    primary_cells = [cell for cell in cells if cell.model == row.model and cell.metric == primary]
    used = [cell for cell in primary_cells if cell.usable]
    mean, total = _weighted_mean(used)
    summary = ModelSummary(
        model=row.model, kind=row.kind, owner_site=row.owner_site, primary_metric=primary, weighted_mean=mean,
        n_total=total, sites_used=[cell.site for cell in used],
        sites_not_used=[cell.site for cell in primary_cells if not cell.usable],
    )
    if row.kind == LOCAL:
        summary.weighted_mean_other_sites, summary.n_other_sites = _weighted_mean(
            [cell for cell in used if cell.site != row.owner_site]
        )
    return summary


def _best_global(models: list[ModelSummary], primary: str | None, notes: list[str]) -> BestGlobalModel:
    rule = BEST_GLOBAL_RULE.format(final=GLOBAL_FINAL_MODEL, best=GLOBAL_BEST_MODEL, metric=primary or "not known")
    nvflare_best = next((model.model for model in models if model.kind == GLOBAL_BEST), None)
    candidates = [model for model in models if model.kind in GLOBAL_KINDS and model.weighted_mean is not None]
    if not candidates:
        return BestGlobalModel(rule, primary, None, None, None, None, [], nvflare_best, None,
                               reason="no global model has a usable value of the primary metric at any site")

    chosen = max(candidates, key=lambda model: (model.weighted_mean, model.kind == GLOBAL_FINAL))
    if len(candidates) > 1 and len({tuple(model.sites_used) for model in candidates}) > 1:
        listed = "; ".join(f"{model.model}: {', '.join(model.sites_used)}" for model in candidates)
        notes.append(f"The global models were validated at different sites ({listed}), so their means "
                     "are over different cases.")
    agrees = None if nvflare_best is None else chosen.model == nvflare_best
    return BestGlobalModel(rule, primary, chosen.model, chosen.kind, chosen.weighted_mean, chosen.n_total,
                           list(chosen.sites_used), nvflare_best, agrees, reason=None)


def _site_description(site: str, rows: list[_Row], parsed) -> ValidationResult | None:
    results = [parsed[(site, row.model)] for row in rows if (site, row.model) in parsed]
    ordered = [result for result in results if result.status == OK] + results
    return next((result for result in ordered if result.follows_contract), None)


def _provenance(inputs: ReportInputs, sites, rows, parsed, generated_at, notes: list[str]) -> Provenance:
    config_hash, config_source = inputs.run.job_config_sha256, None
    if config_hash:
        config_source = inputs.run_file.relpath
    if inputs.job_config is not None:
        file_hash = inputs.job_config.sha256 or None
        if inputs.job_config.error:
            notes.append(inputs.job_config.error)
        elif config_hash and file_hash != config_hash:
            notes.append(f"job_config_sha256 in {inputs.run_file.relpath} ({config_hash}) differs from the SHA-256 "
                         f"of {inputs.job_config.relpath} ({file_hash}).")
        elif not config_hash:
            config_hash, config_source = file_hash, inputs.job_config.relpath

    site_entries = []
    for site in sites:
        described = _site_description(site, rows, parsed)
        if described is None:
            site_entries.append(SiteProvenance(site, {key: None for key in VERSION_KEYS}, None, None, None))
        else:
            site_entries.append(SiteProvenance(site, dict(described.versions), described.manifest_sha256,
                                               described.site_config_sha256, described.seed))
    for key in VERSION_KEYS:
        seen = {entry.versions[key] for entry in site_entries if entry.versions.get(key)}
        if len(seen) > 1:
            listed = ", ".join(f"{entry.site} {entry.versions[key]}" for entry in site_entries if entry.versions.get(key))
            notes.append(f"Sites report different {key} versions: {listed}.")

    moment = generated_at or datetime.now(timezone.utc)
    return Provenance(
        generated_at=moment.isoformat(timespec="seconds"),
        report_fedimaging_version=__version__,
        results_file=inputs.results.relpath,
        results_sha256=inputs.results.sha256,
        run_file=inputs.run_file.relpath if inputs.run_file else None,
        job_config_sha256=config_hash,
        job_config_source=config_source,
        sites=site_entries,
    )


def _protection_notes(job_config: Any) -> list[str]:
    """Notes on how the job protected the sites' updates, read from its fedimaging_job.json."""
    if not isinstance(job_config, dict):
        return []
    notes = []
    if job_config.get("secure_aggregation") is not None:
        notes.append("Secure aggregation (pairwise masking) was on: the server received only masked updates and "
                     "learned only the weighted sum of each round's sites, so cross-site evaluation scored global "
                     "models only.")
    if job_config.get("homomorphic_encryption") is not None:
        notes.append("Homomorphic encryption was on: the server aggregated encrypted updates, so cross-site "
                     "evaluation scored global models only.")
    return notes


def _add_result_notes(sites, rows, parsed, site_problems, validators, notes: list[str]) -> None:
    for site in sites:
        results = [parsed[(site, row.model)] for row in rows if (site, row.model) in parsed]
        for note in dict.fromkeys(result.note for result in results if result.note):
            notes.append(f"{site}: {note}")
        spent = [result.differential_privacy for result in results if result.differential_privacy]
        if spent:
            privacy = max(spent, key=lambda p: p.get("rounds") or 0)
            notes.append(
                f"{site}: differential privacy (client-level DP-FedAvg, Opacus RDP accountant): "
                f"epsilon {float(privacy['epsilon']):.3g} at delta {privacy.get('delta')} after "
                f"{privacy.get('rounds')} rounds, noise multiplier {privacy.get('noise_multiplier')}, "
                f"clip norm {privacy.get('clip_norm')}")
        manifests = {result.manifest_sha256 for result in results if result.manifest_sha256}
        if len(manifests) > 1:
            notes.append(f"{site} reports different manifest_sha256 values for different models, so the models "
                         "may have been validated on different data.")
        if site in site_problems and validators.get(site):
            notes.append(f"{site}: fedimaging_run.json records a problem: {site_problems[site]}")


def _job_name_from_layout(relpath: str) -> str | None:
    """Take the job name from the simulator layout <job>/server/simulate_job/cross_site_val/..."""
    parts = relpath.split("/")
    if len(parts) >= 5 and parts[-3] == "simulate_job" and parts[-4] == "server":
        return parts[-5]
    return None
