"""Render the report as one self-contained HTML page (inline CSS, heatmap as a base64 data URI).

Every string that comes from an input file goes through ``html.escape``. The page names only site
names, model names, hashes and paths relative to RESULT.
"""

from __future__ import annotations

import base64
from html import escape

from fedimaging.report.labels import format_interval, format_value, is_own_site, model_label
from fedimaging.report.model import (
    GLOBAL_KINDS, LOCAL, MISSING, NOT_APPLICABLE, OK, SCHEMA_VERSION, SMALL_SAMPLE, SMALL_SAMPLE_REASON, Cell, Report,
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       color: #1d1d1d; margin: 2rem auto; max-width: 72rem; padding: 0 1.5rem; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d0d0; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.5rem; }
.lead { color: #4a4a4a; margin-top: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.92rem; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border: 1px solid #c8c8c8; padding: 0.35rem 0.6rem; vertical-align: top; text-align: left; }
thead th { background: #eef1f5; }
tbody th { background: #f7f8fa; font-weight: 600; white-space: nowrap; }
td.metric { text-align: center; min-width: 7.5rem; }
td.metric .value { font-size: 1.05rem; font-weight: 700; }
td.failed { background: #ececec; }
td.missing { background: #f6f6f6; }
td.own { outline: 2px dashed #333; outline-offset: -4px; }
.flag { display: inline-block; font-size: 0.78rem; padding: 0 0.35rem; border-radius: 0.25rem;
        border: 1px solid #888; margin: 0.1rem 0.1rem 0; }
.flag.small { border-color: #9a6700; color: #7a5200; background: #fff8e5; }
.flag.own { border-color: #333; }
.flag.bad { border-color: #8a1c1c; color: #8a1c1c; background: #fdeeee; }
.reason { font-size: 0.82rem; color: #444; }
code, .hash { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.82rem;
              word-break: break-all; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: 0.25rem 1.2rem; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d0d0; }
figcaption { font-size: 0.88rem; color: #444; }
.callout { border-left: 4px solid #4a6fa5; background: #f3f6fb; padding: 0.6rem 0.9rem; }
.warning { border-left-color: #9a6700; background: #fff8e5; }
"""


def render_page(report: Report, heatmap_png: bytes) -> str:
    """Return the HTML page of ``report`` with ``heatmap_png`` embedded."""
    run = report.run
    title = "Cross-site validation report" + (f": {run.job_name}" if run.job_name else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="lead">Generated {escape(report.provenance.generated_at)} by fedimaging '
        f"{escape(report.provenance.report_fedimaging_version)}. Primary metric: "
        f"<strong>{escape(run.primary_metric or 'not reported')}</strong>.</p>",
        _summary_section(report),
        _heatmap_section(report, heatmap_png),
        _matrix_section(report, run.primary_metric, heading="Primary metric by model and site", level=2),
        _best_section(report),
        _local_section(report),
        _other_metrics_section(report),
        _problems_section(report),
        _small_sample_section(report),
        _provenance_section(report),
        _notes_section(report),
        f"<p class=\"reason\">report.json beside this page holds the same data (schema_version {SCHEMA_VERSION}).</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _summary_section(report: Report) -> str:
    run, provenance, best = report.run, report.provenance, report.best_global_model
    n_not_applicable = sum(1 for cell in report.cells if cell.status == NOT_APPLICABLE)
    site_counts = {status: sum(1 for site in report.sites if site.status == status) for status in ("ok", "failed", "missing")}
    sites_text = ", ".join(run.expected_sites) or "none"
    source = "fedimaging_run.json" if run.expected_sites_source == "run_file" else "sites seen in the results"
    extra = [site for site in report.site_names if site not in run.expected_sites]
    rows = [
        ("Job", escape(run.job_name or "not recorded")),
        ("Rounds", escape(str(run.rounds)) if run.rounds is not None else "not recorded"),
        ("Task", escape(run.task or "not reported")),
        ("Primary metric", escape(run.primary_metric or "not reported")),
        ("Expected sites", f"{escape(sites_text)} <span class=\"reason\">(from {source})</span>"),
        *([("Other sites with results", escape(", ".join(extra)))] if extra else []),
        ("Site status", f"{site_counts['ok']} ok, {site_counts['failed']} failed, {site_counts['missing']} missing"),
        ("Usable cells", f"{report.usable_cell_count} of {len(report.cells)}"
                         + (f" ({n_not_applicable} not applicable at their site)" if n_not_applicable else "")),
        ("Best global model", escape(best.model) if best.model else escape(best.reason or "none")),
        ("Run seed", escape(str(run.seed)) if run.seed is not None else "not recorded"),
        ("Job config SHA-256", _hash(provenance.job_config_sha256)
         + (f' <span class="reason">({escape(provenance.job_config_source)})</span>' if provenance.job_config_source else "")),
        ("Results file", f"<code>{escape(provenance.results_file)}</code> (SHA-256 {_hash(provenance.results_sha256)})"),
    ]
    items = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows)
    return f'<h2>Run summary</h2><dl class="summary">{items}</dl>'


def _heatmap_section(report: Report, heatmap_png: bytes) -> str:
    data = base64.b64encode(heatmap_png).decode("ascii")
    metric = escape(report.run.primary_metric or "the primary metric")
    return (
        "<h2>Heatmap</h2><figure>"
        f'<img src="data:image/png;base64,{data}" alt="Heatmap of {metric} for each model (rows) at each validating '
        'site (columns); the table below gives the same values.">'
        f"<figcaption>Colour: {metric}. Each cell shows the value, the number of cases n and the 95% bootstrap "
        "interval, or n&lt;5 when there are fewer than 5 cases. Grey cells failed or are missing. A dashed outline "
        "marks a local model at its own site.</figcaption></figure>"
    )


def _cell_html(cell: Cell | None) -> str:
    if cell is None:
        return '<td class="metric missing">–</td>'
    own = is_own_site(cell)
    classes = ["metric"] + (["own"] if own else [])
    flags = ['<span class="flag own">own site</span>'] if own else []
    if not cell.usable:
        classes.append(cell.status)
        body = (f'<span class="flag bad">{escape(cell.status)}</span><br>'
                f'<span class="reason">{escape(cell.reason or "")}</span>')
    else:
        lines = [f'<span class="value">{format_value(cell.value)}</span>', f"n = {cell.n}"]
        if cell.interval:
            lines.append(f"95% CI {format_interval(cell.interval)}")
        if cell.status == SMALL_SAMPLE:
            flags.insert(0, '<span class="flag small" title="fewer than 5 cases: no interval">n&lt;5</span>')
        elif not cell.interval and cell.reason:
            lines.append(f'<span class="reason">{escape(cell.reason)}</span>')
        body = "<br>".join(lines)
    if flags:
        body += "<br>" + " ".join(flags)
    return f'<td class="{" ".join(classes)}">{body}</td>'


def _matrix_section(report: Report, metric: str | None, heading: str, level: int) -> str:
    sites = report.site_names
    cells = {(cell.model, cell.site): cell for cell in report.cells if cell.metric == metric}
    is_primary = metric == report.run.primary_metric
    header = "".join(f'<th scope="col">{escape(site)}</th>' for site in sites)
    if is_primary:
        header += '<th scope="col">Case-weighted mean</th>'
    body = []
    for model in report.models:
        row = [f'<th scope="row">{escape(model_label(model.model, model.kind))}<br>'
               f'<code>{escape(model.model)}</code></th>']
        row.extend(_cell_html(cells.get((model.model, site))) for site in sites)
        if is_primary:
            mean = format_value(model.weighted_mean)
            row.append(f'<td class="metric"><span class="value">{mean}</span><br>n = {model.n_total}</td>')
        body.append("<tr>" + "".join(row) + "</tr>")
    caption = escape(metric or "no metric reported") + " (rows: models; columns: validating sites)"
    return (f"<h{level}>{escape(heading)}</h{level}><div class=\"scroll\"><table><caption>{caption}</caption>"
            f'<thead><tr><th scope="col">Model</th>{header}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _best_section(report: Report) -> str:
    best = report.best_global_model
    parts = ["<h2>Best global model</h2>", f'<p class="callout">{escape(best.rule)}</p>']
    if best.model is None:
        parts.append(f"<p>No best global model: {escape(best.reason or 'no candidate')}.</p>")
    else:
        parts.append(
            f"<p>Chosen by this rule: <strong>{escape(model_label(best.model, best.model_kind or ''))}</strong> "
            f"(<code>{escape(best.model)}</code>), case-weighted mean {format_value(best.weighted_mean)} over "
            f"{best.n_total} cases at {escape(', '.join(best.sites_used))}.</p>"
        )
        nvflare_mean = next((model.weighted_mean for model in report.models
                             if model.model == best.nvflare_best_model), None)
        if best.agrees_with_nvflare_best is False and nvflare_mean == best.weighted_mean:
            parts.append(
                f"<p>NVFlare's best model (<code>{escape(best.nvflare_best_model or '')}</code>), which NVFlare "
                "selected during training, ties with it by this rule; on a tie the rule takes the final "
                "model.</p>"
            )
        elif best.agrees_with_nvflare_best is False:
            parts.append(
                f"<p>NVFlare's best model (<code>{escape(best.nvflare_best_model or '')}</code>), which NVFlare "
                "selected during training and which lags a round, is <strong>not</strong> the best by this rule.</p>"
            )
        elif best.agrees_with_nvflare_best:
            parts.append("<p>This is also the model NVFlare selected as best during training.</p>")

    rows = []
    for model in report.models:
        if model.kind not in GLOBAL_KINDS:
            continue
        rows.append(
            f'<tr><th scope="row">{escape(model_label(model.model, model.kind))}</th><td>{format_value(model.weighted_mean)}</td>'
            f"<td>{model.n_total}</td><td>{escape(', '.join(model.sites_used) or 'none')}</td>"
            f"<td>{escape(', '.join(model.sites_not_used) or 'none')}</td></tr>"
        )
    parts.append(
        '<div class="scroll"><table><caption>Global models compared</caption><thead><tr><th scope="col">Model</th>'
        '<th scope="col">Case-weighted mean</th><th scope="col">Cases</th><th scope="col">Sites used</th>'
        f'<th scope="col">Sites failed or missing</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
    )
    return "".join(parts)


def _local_section(report: Report) -> str:
    statement = (
        "A local model evaluated at its own site (dashed outline, flag “own site”) was validated on data of the "
        "same site that trained it: held-out cases where the site has them, else its training cases (see the "
        "notes). Such a cell is not evidence of generalisation; only the other sites' cells show how the model "
        "transfers."
    )
    parts = ["<h2>Local models and generalisation</h2>", f'<p class="callout warning">{statement}</p>']
    local = [model for model in report.models if model.kind == LOCAL]
    if not local:
        parts.append("<p>No local model was validated in this run.</p>")
        return "".join(parts)
    rows = "".join(
        f'<tr><th scope="row">{escape(model_label(model.model, model.kind))}</th>'
        f"<td>{format_value(model.weighted_mean)} (n = {model.n_total})</td>"
        f"<td>{format_value(model.weighted_mean_other_sites)} (n = {model.n_other_sites or 0})</td></tr>"
        for model in local
    )
    parts.append(
        '<div class="scroll"><table><caption>Case-weighted mean of the primary metric</caption><thead><tr>'
        '<th scope="col">Model</th><th scope="col">All sites</th><th scope="col">Other sites only</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )
    return "".join(parts)


def _other_metrics_section(report: Report) -> str:
    others = [metric for metric in report.run.metrics if metric != report.run.primary_metric]
    if not others:
        return "<h2>Other metrics</h2><p>The sites reported no metric besides the primary metric.</p>"
    tables = [_matrix_section(report, metric, heading=metric, level=3) for metric in others]
    return "<h2>Other metrics</h2>" + "".join(tables)


def _problems_section(report: Report) -> str:
    parts = ["<h2>Failed and missing sites and cells</h2>"]
    bad_sites = [site for site in report.sites if site.status != OK or site.reason]
    if bad_sites:
        rows = "".join(
            f'<tr><th scope="row">{escape(site.site)}</th><td>{escape(site.status)}</td><td>{escape(site.reason or "")}</td></tr>'
            for site in bad_sites
        )
        parts.append('<div class="scroll"><table><caption>Sites</caption><thead><tr><th scope="col">Site</th>'
                     f'<th scope="col">Status</th><th scope="col">Reason</th></tr></thead><tbody>{rows}</tbody></table></div>')
    else:
        parts.append("<p>Every site returned results for every model.</p>")

    # One line per (model, site, status, reason), listing the metrics it affects.
    groups: dict[tuple, list[str]] = {}
    for cell in report.cells:
        if not cell.usable:
            groups.setdefault((cell.model, cell.site, cell.status, cell.reason), []).append(cell.metric or "–")
    if not groups:
        parts.append("<p>No cell failed or is missing.</p>")
        return "".join(parts)
    all_metrics = len(report.run.metrics) or 1
    rows = "".join(
        f"<tr><td><code>{escape(model)}</code></td><td>{escape(site)}</td><td>{escape(status)}</td>"
        f"<td>{'all metrics' if len(metrics) == all_metrics else escape(', '.join(metrics))}</td>"
        f"<td>{escape(reason or '')}</td></tr>"
        for (model, site, status, reason), metrics in groups.items()
    )
    parts.append('<div class="scroll"><table><caption>Cells</caption><thead><tr><th scope="col">Model</th>'
                 '<th scope="col">Site</th><th scope="col">Status</th><th scope="col">Metrics</th>'
                 f'<th scope="col">Reason</th></tr></thead><tbody>{rows}</tbody></table></div>')
    return "".join(parts)


def _small_sample_section(report: Report) -> str:
    small = sorted({(cell.model, cell.site) for cell in report.cells if cell.status == SMALL_SAMPLE})
    text = (f"<p>The flag <span class=\"flag small\">n&lt;5</span> means {escape(SMALL_SAMPLE_REASON)}. The sites "
            "compute the 95% interval by bootstrap resampling of patients and report none for fewer than 5 cases. "
            "The value of such a cell is shown and counts in the case-weighted means, weighted by its small n.</p>")
    if small:
        listed = ", ".join(f"{escape(model)} at {escape(site)}" for model, site in small)
        text += f"<p>Small-sample cells in this run: {listed}.</p>"
    else:
        text += "<p>No cell in this run has fewer than 5 cases.</p>"
    return "<h2>Small samples</h2>" + text


def _provenance_section(report: Report) -> str:
    header = "".join(f'<th scope="col">{name}</th>' for name in (
        "Site", "Status", "Cases", "Patients", "fedimaging", "NVFlare", "MONAI", "torch", "Seed",
        "Manifest SHA-256", "Site config SHA-256"))
    statuses = {site.site: site for site in report.sites}
    rows = []
    for entry in report.provenance.sites:
        site = statuses.get(entry.site)
        values = [
            escape(site.status if site else MISSING),
            _number(site.n_cases if site else None),
            _number(site.n_patients if site else None),
            *(escape(entry.versions.get(key) or "–") for key in ("fedimaging", "nvflare", "monai", "torch")),
            _number(entry.seed),
            _hash(entry.manifest_sha256),
            _hash(entry.site_config_sha256),
        ]
        rows.append(f'<tr><th scope="row">{escape(entry.site)}</th>' + "".join(f"<td>{v}</td>" for v in values) + "</tr>")
    return (
        "<h2>Provenance</h2><p>Versions, seeds and hashes as each site reported them with its results.</p>"
        f'<div class="scroll"><table><caption>Per site</caption><thead><tr>{header}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>'
    )


def _notes_section(report: Report) -> str:
    if not report.notes:
        return "<h2>Notes</h2><p>None.</p>"
    items = "".join(f"<li>{escape(note)}</li>" for note in report.notes)
    return f"<h2>Notes</h2><ul>{items}</ul>"


def _hash(value: str | None) -> str:
    return f'<span class="hash">{escape(value)}</span>' if value else "not recorded"


def _number(value: int | None) -> str:
    return "–" if value is None else str(value)
