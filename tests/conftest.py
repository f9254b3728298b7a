"""Shared fixtures: paths to the real data beside the repository and a helper that runs the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
CASES = SHARED / "cases"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data {path} not found; the shared data folder must sit beside the repository")
    return path


@pytest.fixture
def prepare(tmp_path):
    """Run ``prepare_dicom`` into a fresh folder and return (manifest, out folder)."""
    from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom

    counter = {"n": 0}

    def run(source: Path, **kwargs):
        counter["n"] += 1
        out = tmp_path / f"out{counter['n']}"
        options = PrepareOptions(source=Path(source), out=out, key_file=tmp_path / "site.key", **kwargs)
        manifest = prepare_dicom(options)
        assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
        return manifest, out

    return run
