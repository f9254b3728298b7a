"""Slide-level labels (CSV) and region annotations (GeoJSON, as QuPath exports them).

GeoJSON coordinates are level-0 pixels. A tile takes the class of the region containing its centre;
where regions overlap, the smallest region wins, because it is the most specific annotation.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import shape

from preprocessing.reasons import Reason, Rejection

ANNOTATION_SUFFIXES = (".geojson", ".json")


class LabelFileError(ValueError):
    """A labels CSV that cannot be used at all."""


@dataclass
class SlideLabel:
    """Class and optional patient of a slide, from the labels CSV."""

    class_name: str
    patient: str | None
    slide: str = ""  # The slide file name as written in the CSV row.


def read_slide_labels(csv_path: Path) -> dict[str, SlideLabel]:
    """Read ``slide,label[,patient]`` rows; keys are file names with and without extension."""
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelFileError(f"{csv_path}: cannot read CSV ({exc})") from exc
    if not rows or "slide" not in rows[0] or "label" not in rows[0]:
        raise LabelFileError(f"{csv_path}: expected a header row with 'slide' and 'label' columns (and optionally 'patient')")
    labels = {}
    for number, row in enumerate(rows, start=2):
        slide, label = (row.get("slide") or "").strip(), (row.get("label") or "").strip()
        if not slide or not label:
            raise LabelFileError(f"{csv_path}: line {number} needs both a slide file name and a label")
        entry = SlideLabel(label, (row.get("patient") or "").strip() or None, slide)
        labels[slide] = entry
        labels.setdefault(Path(slide).stem, entry)
    return labels


def _class_name(properties: dict) -> str | None:
    classification = properties.get("classification")
    if isinstance(classification, dict) and classification.get("name"):
        return str(classification["name"])
    for key in ("class", "label", "name"):
        if properties.get(key):
            return str(properties[key])
    return None


@dataclass
class Regions:
    """Annotated regions of one slide, sorted so the smallest comes first."""

    geometries: list
    class_names: list[str]

    def classify(self, points_level0: np.ndarray) -> list[str | None]:
        """Class name of the smallest region containing each (x, y) point, or None outside all."""
        result: list[str | None] = [None] * len(points_level0)
        points = shapely.points(points_level0)
        for geometry, class_name in zip(self.geometries, self.class_names):
            inside = shapely.contains(geometry, points)
            for index in np.flatnonzero(inside):
                if result[index] is None:
                    result[index] = class_name
        return result


def read_regions(path: Path) -> Regions:
    """Read polygons with class names from a GeoJSON FeatureCollection or a list of features."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejection(Reason.ANNOTATION_INVALID, f"{path.name}: not valid JSON ({exc})") from exc
    features = payload.get("features", []) if isinstance(payload, dict) else payload
    if isinstance(payload, dict) and payload.get("type") == "Feature":
        features = [payload]
    regions = []
    for index, feature in enumerate(features or []):
        if not isinstance(feature, dict) or not feature.get("geometry"):
            continue
        class_name = _class_name(feature.get("properties") or {})
        if class_name is None:
            raise Rejection(
                Reason.ANNOTATION_INVALID,
                f"{path.name}: feature {index + 1} of {len(features)} has no class name "
                "(properties.classification.name); classify every annotation in QuPath before exporting",
            )
        try:
            geometry = shape(feature["geometry"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise Rejection(Reason.ANNOTATION_INVALID, f"{path.name}: feature {index + 1} of {len(features)} has an invalid geometry ({exc})") from exc
        if geometry.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        if not geometry.is_valid:
            geometry = shapely.make_valid(geometry)
        regions.append((geometry.area, geometry, class_name))
    if not regions:
        raise Rejection(Reason.ANNOTATION_INVALID, f"{path.name}: no polygon annotations found")
    regions.sort(key=lambda item: item[0])
    for _, geometry, _ in regions:
        shapely.prepare(geometry)
    return Regions([g for _, g, _ in regions], [c for _, _, c in regions])


def find_annotation(folder: Path, slide_path: Path) -> Path | None:
    """The annotation file for a slide: ``<slide file name without extension>.geojson`` (or ``.json``)."""
    for suffix in ANNOTATION_SUFFIXES:
        for name in (slide_path.stem + suffix, slide_path.name + suffix):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None
