"""Read a site's prepared folder (``datalist.json`` and the site-local ``manifest.json``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fedimaging_app.config import ConfigError


@dataclass
class PreparedData:
    """A site's datalist items with absolute paths, and facts from its manifest."""

    root: Path
    training: list[dict]
    validation: list[dict]
    patient_of: dict[str, str]
    manifest: dict
    manifest_sha256: str
    classes: list[str] | None


def load_prepared(data_dir: Path) -> PreparedData:
    """Load ``datalist.json`` and ``manifest.json`` from ``data_dir``; raise ``ConfigError`` naming the fix."""
    data_dir = Path(data_dir)
    datalist_path, manifest_path = data_dir / "datalist.json", data_dir / "manifest.json"
    for path in (datalist_path, manifest_path):
        if not path.is_file():
            raise ConfigError(
                f"{path} not found; run 'fedimaging prepare dicom|wsi ... --out {data_dir}' first, "
                "or fix data_dir in the site configuration"
            )
    datalist = json.loads(datalist_path.read_text())
    manifest_bytes = manifest_path.read_bytes()
    manifest = json.loads(manifest_bytes)
    patient_of: dict[str, str] = {}
    for case in manifest.get("cases", []):
        patient_of[case["case_id"]] = case.get("patient_id") or case["case_id"]
    for slide in manifest.get("slides", []):
        patient_of[slide["slide_id"]] = slide.get("patient_id") or slide["slide_id"]
    return PreparedData(
        root=data_dir,
        training=list(datalist.get("training", [])),
        validation=list(datalist.get("validation", [])),
        patient_of=patient_of,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        classes=datalist.get("classes"),
    )


def unit_id(item: dict) -> str:
    """Return the case, slide or tile an item belongs to (the unit that patients are made of)."""
    return item.get("case_id") or item.get("slide_id") or item.get("tile_id") or item["image"]
