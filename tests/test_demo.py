"""The one-command demo, end to end in its fast form."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_fast_runs_everything(tmp_path):
    workspace = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "fedimaging", "demo", "--workspace", str(workspace), "--fast"],
                            capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "segmentation report:" in result.stdout and "classification report:" in result.stdout

    for task in ("segmentation", "classification"):
        report = json.loads((workspace / "reports" / task / "report.json").read_text())
        assert [site["site"] for site in report["sites"]] == ["site-1", "site-2", "site-3"]
        assert all(site["status"] == "ok" for site in report["sites"])
        assert report["best_global_model"]["model"] in ("SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt")
        assert (workspace / "reports" / task / "report.html").is_file()

    # Made-up patient identifiers stay at the sites: never in what the server or evaluators see.
    shared = [*workspace.glob("reports/**/*.*"), *workspace.glob("runs/*/sim/server/**/*.json"),
              *workspace.glob("prepared/*/*/datalist.json")]
    assert shared
    for path in shared:
        if path.suffix in (".json", ".html"):
            text = path.read_text()
            assert "DEMO^" not in text, path
            assert "CASE0" not in text, path
