"""``fedimaging report`` on hand-made simulator workspaces and downloaded job results.

The fixtures follow the input contract of the federated jobs: ``cross_val_results.json`` shaped
``{validator: {model: fedimaging metrics}}``, an optional ``fedimaging_run.json`` and the job's
``app_server/custom/fedimaging_job.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

FINAL = "SRV_FL_global_model.pt"
BEST = "SRV_best_FL_global_model.pt"
METRICS = ["dice_mean", "dice_aorta", "dice_liver"]
SITE_CASES = {"site-1": 20, "site-2": 10, "site-3": 3}
VERSIONS = {"fedimaging": "0.1.0", "monai": "1.5.0", "torch": "2.13.0", "nvflare": "2.9.0"}
SINGLE_CASE_NOTE = "trained and validated on the same single case"

# dice_mean per (model, validating site). The final model wins by the case-weighted rule
# (26.4 / 33 = 0.8 against 25.9 / 33 = 0.7848), although NVFlare's best model has the higher
# unweighted mean (0.76 against 0.6867).
DICE_MEAN = {
    (FINAL, "site-1"): 0.86, (FINAL, "site-2"): 0.80, (FINAL, "site-3"): 0.40,
    (BEST, "site-1"): 0.80, (BEST, "site-2"): 0.78, (BEST, "site-3"): 0.70,
    ("site-1", "site-1"): 0.90, ("site-1", "site-2"): 0.60, ("site-1", "site-3"): 0.50,
    ("site-2", "site-1"): 0.55, ("site-2", "site-2"): 0.88, ("site-2", "site-3"): 0.45,
    ("site-3", "site-1"): 0.30, ("site-3", "site-3"): 0.95,
}
FAILED_REASON = "CUDA out of memory while validating"


def metrics_result(site: str, dice_mean: float, *, note: str | None = None) -> dict:
    n = SITE_CASES[site]
    small = n < 5
    metrics = {}
    for offset, name in enumerate(METRICS):
        value = dice_mean if name == "dice_mean" else round(dice_mean - 0.05 * offset, 4)
        metrics[name] = {
            "value": value, "n": n, "ci95": None if small else [round(value - 0.04, 4), round(value + 0.03, 4)],
            "small_sample": small,
        }
    return {
        "fedimaging_metrics": 1, "task": "segmentation", "primary_metric": "dice_mean", "metrics": metrics,
        "n_cases": n, "n_patients": n, "status": "ok", "reason": None,
        "manifest_sha256": hashlib.sha256(f"manifest {site}".encode()).hexdigest(),
        "site_config_sha256": hashlib.sha256(f"config {site}".encode()).hexdigest(),
        "seed": 7, "versions": VERSIONS, "note": note,
    }


def cross_val_results(dice_mean: dict = DICE_MEAN) -> dict:
    """site-1..3 validate five models; site-2 fails on the site-3 model; site-4 sends nothing."""
    results: dict = {}
    for (model, site), value in dice_mean.items():
        note = SINGLE_CASE_NOTE if site == "site-3" else None
        results.setdefault(site, {})[model] = metrics_result(site, value, note=note)
    results["site-2"]["site-3"] = {
        "fedimaging_metrics": 1, "task": "segmentation", "primary_metric": "dice_mean", "metrics": {},
        "n_cases": 10, "n_patients": 10, "status": "failed", "reason": FAILED_REASON,
        "manifest_sha256": hashlib.sha256(b"manifest site-2").hexdigest(), "site_config_sha256": None, "seed": 7,
        "versions": VERSIONS, "note": None,
    }
    # site-1 did not report dice_aorta for the site-2 model.
    del results["site-1"]["site-2"]["metrics"]["dice_aorta"]
    return results


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def simulator_workspace(root: Path, results: dict | None = None, run: dict | None = None) -> Path:
    job = root / "workspace" / "fed_abdomen"
    simulate_job = job / "server" / "simulate_job"
    write_json(simulate_job / "cross_site_val" / "cross_val_results.json", results or cross_val_results())
    write_json(simulate_job / "app_server" / "custom" / "fedimaging_job.json", {"task": "segmentation"})
    write_json(job / "fedimaging_run.json", run or {
        "job_name": "fed_abdomen", "expected_sites": ["site-1", "site-2", "site-3", "site-4"],
        "job_config_sha256": "a" * 64, "rounds": 5, "seed": 3,
        "site_problems": {"site-4": "site-4 has no prepared data (datalist.json not found)"},
    })
    return root / "workspace"


def downloaded_job(root: Path, results: dict) -> tuple[Path, bytes]:
    job = root / "download" / "4f1c2d3e-job"
    write_json(job / "workspace" / "cross_site_val" / "cross_val_results.json", results)
    config = write_json(job / "app_server" / "custom" / "fedimaging_job.json", {"task": "segmentation", "rounds": 2})
    write_json(job / "meta.json", {"name": "fed_abdomen"})
    return root / "download", config.read_bytes()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedimaging", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def make_report(result: Path, out: Path) -> dict:
    completed = run_cli("report", str(result), "--out", str(out))
    assert completed.returncode == 0, completed.stderr
    return json.loads((out / "report.json").read_text())


def cell(report: dict, model: str, site: str, metric: str = "dice_mean") -> dict:
    matches = [c for c in report["cells"] if (c["model"], c["site"], c["metric"]) == (model, site, metric)]
    assert len(matches) == 1, (model, site, metric)
    return matches[0]


def weighted(values_and_n: list[tuple[float, int]]) -> float:
    return sum(value * n for value, n in values_and_n) / sum(n for _value, n in values_and_n)


@pytest.fixture
def simulated(tmp_path) -> tuple[dict, Path]:
    out = tmp_path / "report"
    return make_report(simulator_workspace(tmp_path), out), out


def test_cells_one_per_model_site_metric(simulated):
    report, _out = simulated
    models = [FINAL, BEST, "site-1", "site-2", "site-3", "site-4"]
    assert report["schema_version"] == 1
    assert [m["model"] for m in report["models"]] == models
    assert report["run"]["expected_sites"] == ["site-1", "site-2", "site-3", "site-4"]
    assert len(report["cells"]) == len(models) * 4 * len(METRICS)
    assert report["run"]["metrics"] == ["dice_mean", "dice_aorta", "dice_liver"]
    keys = {"model", "model_kind", "site", "metric", "value", "n", "interval", "status", "reason"}
    assert all(set(c) == keys for c in report["cells"])


def test_cell_statuses_and_reasons(simulated):
    report, _out = simulated
    ok = cell(report, FINAL, "site-1")
    assert (ok["status"], ok["value"], ok["n"], ok["interval"]) == ("ok", 0.86, 20, [0.82, 0.89])
    assert ok["model_kind"] == "global_final"

    small = cell(report, BEST, "site-3")
    assert small["status"] == "small_sample"
    assert small["interval"] is None
    assert small["value"] == 0.70
    assert "fewer than 5 cases" in small["reason"]

    for metric in METRICS:
        failed = cell(report, "site-3", "site-2", metric)
        assert failed["status"] == "failed"
        assert failed["reason"] == FAILED_REASON
        assert failed["value"] is None

    missing_metric = cell(report, "site-2", "site-1", "dice_aorta")
    assert missing_metric["status"] == "missing"
    assert "metric" in missing_metric["reason"]

    for model in [FINAL, BEST, "site-1"]:
        absent = cell(report, model, "site-4")
        assert absent["status"] == "missing"
        assert absent["reason"] == "site-4 has no prepared data (datalist.json not found)"

    never_validated = cell(report, "site-4", "site-1")
    assert never_validated["status"] == "missing"
    assert never_validated["reason"] == "no site returned a result for this model"
    assert cell(report, "site-3", "site-3")["model_kind"] == "local"
    assert cell(report, BEST, "site-1")["model_kind"] == "global_best"


def test_site_summaries(simulated):
    report, _out = simulated
    sites = {s["site"]: s for s in report["sites"]}
    assert [s["site"] for s in report["sites"]] == ["site-1", "site-2", "site-3", "site-4"]
    assert sites["site-1"]["status"] == "ok"
    assert sites["site-1"]["n_cases"] == 20
    assert sites["site-1"]["manifest_sha256"] == hashlib.sha256(b"manifest site-1").hexdigest()
    assert sites["site-2"]["status"] == "ok"
    assert sites["site-1"]["reason"] is None
    assert sites["site-2"]["reason"] == "validation failed for 1 of 5 models"
    assert sites["site-4"]["status"] == "missing"
    assert sites["site-4"]["reason"] == "site-4 has no prepared data (datalist.json not found)"
    assert sites["site-4"]["n_cases"] is None


def test_case_weighted_means_by_hand(simulated):
    report, _out = simulated
    models = {m["model"]: m for m in report["models"]}

    final = weighted([(0.86, 20), (0.80, 10), (0.40, 3)])
    assert math.isclose(final, 26.4 / 33)
    assert math.isclose(models[FINAL]["weighted_mean"], final)
    assert models[FINAL]["n_total"] == 33
    assert models[FINAL]["sites_used"] == ["site-1", "site-2", "site-3"]
    assert models[FINAL]["sites_not_used"] == ["site-4"]
    assert math.isclose(models[BEST]["weighted_mean"], 25.9 / 33)

    # The site-3 model failed at site-2, so its mean is over site-1 and site-3 only.
    site3 = models["site-3"]
    assert math.isclose(site3["weighted_mean"], weighted([(0.30, 20), (0.95, 3)]))
    assert site3["sites_not_used"] == ["site-2", "site-4"]
    assert math.isclose(site3["weighted_mean_other_sites"], 0.30)
    assert site3["n_other_sites"] == 20
    assert math.isclose(models["site-1"]["weighted_mean_other_sites"], weighted([(0.60, 10), (0.50, 3)]))
    assert models["site-4"]["weighted_mean"] is None
    assert models["site-4"]["n_total"] == 0


def test_best_global_not_nvflare_best(simulated):
    report, _out = simulated
    best = report["best_global_model"]
    assert best["model"] == FINAL
    assert best["model_kind"] == "global_final"
    assert math.isclose(best["weighted_mean"], 0.8)
    assert best["nvflare_best_model"] == BEST
    assert best["agrees_with_nvflare_best"] is False
    assert "highest case-weighted mean of the primary metric (dice_mean)" in best["rule"]


def test_best_global_agrees_in_download(tmp_path):
    values = dict(DICE_MEAN)
    values[(BEST, "site-1")] = 0.90
    result, config_bytes = downloaded_job(tmp_path, cross_val_results(values))
    report = make_report(result, tmp_path / "out")

    best = report["best_global_model"]
    assert best["model"] == BEST
    assert best["agrees_with_nvflare_best"] is True
    assert math.isclose(best["weighted_mean"], weighted([(0.90, 20), (0.78, 10), (0.70, 3)]))

    # Without a run file the expected sites are the sites seen in the results.
    assert report["run"]["expected_sites"] == ["site-1", "site-2", "site-3"]
    assert report["run"]["expected_sites_source"] == "results"
    assert report["provenance"]["run_file"] is None
    assert report["provenance"]["job_config_sha256"] == hashlib.sha256(config_bytes).hexdigest()
    assert report["provenance"]["job_config_source"] == "4f1c2d3e-job/app_server/custom/fedimaging_job.json"
    assert report["provenance"]["results_file"] == "4f1c2d3e-job/workspace/cross_site_val/cross_val_results.json"


def test_best_global_tie_goes_to_final(tmp_path):
    values = {key: value for key, value in DICE_MEAN.items() if key[0] != BEST}
    values.update({(BEST, site): DICE_MEAN[(FINAL, site)] for site in SITE_CASES})
    result, _config = downloaded_job(tmp_path, cross_val_results(values))
    report = make_report(result, tmp_path / "out")
    assert report["best_global_model"]["model"] == FINAL
    page = (tmp_path / "out" / "report.html").read_text()
    assert "ties with it by this rule" in page
    assert "is <strong>not</strong> the best" not in page


def test_provenance_and_notes(simulated):
    report, _out = simulated
    provenance = report["provenance"]
    assert provenance["job_config_sha256"] == "a" * 64
    assert provenance["job_config_source"] == "fed_abdomen/fedimaging_run.json"
    assert provenance["run_file"] == "fed_abdomen/fedimaging_run.json"
    assert provenance["report_fedimaging_version"] == "0.1.0"
    assert provenance["generated_at"].endswith("+00:00")
    per_site = {entry["site"]: entry for entry in provenance["sites"]}
    assert per_site["site-2"]["versions"] == VERSIONS
    assert per_site["site-2"]["seed"] == 7
    assert per_site["site-3"]["manifest_sha256"] == hashlib.sha256(b"manifest site-3").hexdigest()
    assert per_site["site-4"]["manifest_sha256"] is None
    assert report["run"]["job_name"] == "fed_abdomen"
    assert report["run"]["rounds"] == 5
    assert report["run"]["seed"] == 3

    assert f"site-3: {SINGLE_CASE_NOTE}" in report["notes"]
    # The run file's hash differs from the hash of the job config file in the workspace.
    assert any("differs from the SHA-256 of" in note for note in report["notes"])


def test_site_outside_expected_sites(tmp_path):
    results = cross_val_results()
    results["site-5"] = {FINAL: metrics_result("site-1", 0.7)}
    report = make_report(simulator_workspace(tmp_path, results), tmp_path / "out")
    assert report["run"]["expected_sites"] == ["site-1", "site-2", "site-3", "site-4"]
    assert [s["site"] for s in report["sites"]] == ["site-1", "site-2", "site-3", "site-4", "site-5"]
    assert cell(report, FINAL, "site-5")["value"] == 0.7
    assert "Sites not listed in expected_sites sent validation results: site-5." in report["notes"]
    assert math.isclose(report["models"][0]["weighted_mean"], weighted([(0.86, 20), (0.80, 10), (0.40, 3), (0.7, 20)]))


def test_html_content(simulated, tmp_path):
    _report, out = simulated
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "The best global model is the global model (SRV_FL_global_model.pt or SRV_best_FL_global_model.pt) with the highest case-weighted mean" in page
    assert "0.860" in page
    assert "n = 20" in page
    assert "95% CI [0.820, 0.890]" in page
    assert "n&lt;5" in page
    assert "fewer than 5 cases: no interval" in page
    assert FAILED_REASON in page
    assert "site-4 has no prepared data" in page
    assert "not evidence of generalisation" in page
    assert SINGLE_CASE_NOTE in page
    assert "<caption>dice_liver" in page
    # The base64 image could contain any short string by chance, so the text checks skip it.
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert str(tmp_path) not in text
    assert "/tmp/" not in text
    assert str(tmp_path) not in (out / "report.json").read_text()
    assert "<link" not in text
    assert "<script" not in text
    assert "http" not in text


def test_heatmap_png_valid(simulated):
    _report, out = simulated
    data = (out / "heatmap.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert 900 <= width <= 3000
    assert 600 <= height <= 3000
    assert 20_000 < len(data) < 2_000_000


def test_input_text_escaped(tmp_path):
    results = cross_val_results()
    results["site-1"][FINAL]["note"] = "<script>alert(1)</script> & co"
    # Two dollar signs would start matplotlib mathtext, and this one does not parse.
    results["site-2"]["site-3"]["reason"] = "quota $^{x$ exceeded"
    result = simulator_workspace(tmp_path, results)
    make_report(result, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "quota $^{x$ exceeded" in page
    assert (tmp_path / "out" / "heatmap.png").stat().st_size > 20_000


def test_empty_results_exit_1(tmp_path):
    folder = tmp_path / "job" / "server" / "simulate_job" / "cross_site_val"
    write_json(folder / "cross_val_results.json", {})
    out = tmp_path / "out"
    completed = run_cli("report", str(tmp_path / "job"), "--out", str(out))
    assert completed.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert report["cells"] == []
    assert "server/simulate_job/cross_site_val/cross_val_results.json contains no validation results." in report["notes"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "contains no validation results" in (out / "report.html").read_text()


def test_unusual_results_kept_as_failed(tmp_path):
    results = cross_val_results()
    results["site-1"][BEST] = {}
    results["site-2"][BEST] = {"val_acc": 0.8}
    results["site-3"][BEST] = None
    results["site-1"][FINAL]["metrics"]["dice_liver"]["value"] = float("nan")
    result = simulator_workspace(tmp_path, results)
    report = make_report(result, tmp_path / "out")

    assert cell(report, BEST, "site-1")["status"] == "failed"
    assert "empty result" in cell(report, BEST, "site-1")["reason"]
    assert "not in the fedimaging metrics format" in cell(report, BEST, "site-2")["reason"]
    assert cell(report, BEST, "site-3")["status"] == "missing"
    assert cell(report, FINAL, "site-1", "dice_liver")["status"] == "failed"
    assert report["models"][1]["weighted_mean"] is None
    assert report["best_global_model"]["model"] == FINAL
    # report.json is strict JSON: NaN never appears.
    json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=lambda token: pytest.fail(token))


def test_cli_missing_result_exit_2(tmp_path):
    missing = tmp_path / "no-such-workspace"
    completed = run_cli("report", str(missing), "--out", str(tmp_path / "out"))
    assert completed.returncode == 2
    assert str(missing) in completed.stderr
    assert "fedimaging simulate" in completed.stderr


def test_cli_no_results_file_exit_2(tmp_path):
    (tmp_path / "workspace" / "fed_abdomen" / "server").mkdir(parents=True)
    completed = run_cli("report", str(tmp_path / "workspace"), "--out", str(tmp_path / "out"))
    assert completed.returncode == 2
    assert "cross_site_val/cross_val_results.json" in completed.stderr
    assert "fedimaging simulate" in completed.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_cli_two_jobs_exit_2(tmp_path):
    result = simulator_workspace(tmp_path)
    write_json(result / "other_job" / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json", {})
    completed = run_cli("report", str(result), "--out", str(tmp_path / "out"))
    assert completed.returncode == 2
    assert "other_job/server/simulate_job/cross_site_val/cross_val_results.json" in completed.stderr


def test_cli_no_usable_cell_exit_1(tmp_path):
    results = {site: {FINAL: {}, BEST: {}} for site in SITE_CASES}
    result = simulator_workspace(tmp_path, results)
    out = tmp_path / "out"
    completed = run_cli("report", str(result), "--out", str(out))
    assert completed.returncode == 1
    assert "no usable cell" in completed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["cells"]
    assert {c["status"] for c in report["cells"]} == {"failed", "missing"}
    assert report["best_global_model"]["model"] is None
    assert "empty result" in (out / "report.html").read_text()


def test_cli_unreadable_results_exit_1(tmp_path):
    result = simulator_workspace(tmp_path)
    (result / "fed_abdomen" / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json").write_text("{oops")
    completed = run_cli("report", str(result), "--out", str(tmp_path / "out"))
    assert completed.returncode == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("is not valid JSON" in note for note in report["notes"])
    assert {c["status"] for c in report["cells"]} == {"missing"}


def test_cli_success_prints_location(tmp_path):
    out = tmp_path / "out"
    completed = run_cli("report", str(simulator_workspace(tmp_path)), "--out", str(out))
    assert completed.returncode == 0
    assert str(out / "report.html") in completed.stdout
    assert "best global model by the report's rule: SRV_FL_global_model.pt" in completed.stdout


def test_report_imports_no_training_stack(tmp_path):
    result = simulator_workspace(tmp_path)
    code = (
        "import sys; from fedimaging.cli import main; "
        f"status = main(['report', {str(result)!r}, '--out', {str(tmp_path / 'out')!r}]); "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'monai', 'openslide', 'nvflare', 'fedimaging_app')); "
        "print('LOADED', loaded); sys.exit(status)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "LOADED []" in completed.stdout


def test_not_applicable_metric_is_not_failure(tmp_path):
    results = cross_val_results()
    for model_results in results["site-1"].values():
        entry = model_results["metrics"].setdefault(METRICS[1], {})
        entry.update({"value": None, "n": 0, "ci95": None, "not_applicable": True,
                      "reason": "not annotated at this site (an optional class its labels lack)"})
    report = make_report(simulator_workspace(tmp_path / "ws", results), tmp_path / "out")
    target = cell(report, "SRV_FL_global_model.pt", "site-1", METRICS[1])
    assert target["status"] == "not_applicable"
    assert "not annotated" in target["reason"]
    assert cell(report, "SRV_FL_global_model.pt", "site-1")["status"] in ("ok", "small_sample")
    assert any("covers fewer classes" in note for note in report["notes"])
    assert all(c["status"] != "failed" for c in report["cells"] if c["site"] == "site-1" and c["metric"] == METRICS[1])


def test_secure_aggregation_noted(tmp_path):
    result, _config = downloaded_job(tmp_path / "plain", cross_val_results(DICE_MEAN))
    plain = make_report(result, tmp_path / "out-plain")
    assert not any("Secure aggregation" in note for note in plain["notes"])

    result, _config = downloaded_job(tmp_path / "masked", cross_val_results(DICE_MEAN))
    config = result / "4f1c2d3e-job" / "app_server" / "custom" / "fedimaging_job.json"
    write_json(config, {"task": "segmentation", "secure_aggregation": {}})
    masked = make_report(result, tmp_path / "out-masked")
    assert any(note.startswith("Secure aggregation (pairwise masking) was on") for note in masked["notes"])
