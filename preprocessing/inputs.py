"""Find image and label inputs: walk SOURCE and LABELS, read CSV lists, apply the naming rule.

Naming rule for ``--labels FOLDER``: a label file matches an image when its name without the volume
suffix equals the image key, optionally followed by one of ``LABEL_SUFFIXES``. The key of a DICOM
series is the name of the folder holding its files (the file stem for a single file); the key of
a research volume is its file stem. A sub-folder of LABELS named like the key (with or without a
suffix) holds one mask file per structure.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.research import is_research_volume, research_stem

LABEL_SUFFIXES = ("", "_seg", "-seg", "_label", "-label", "_labels", "_mask", "_masks", "_gt")
CSV_IMAGE_COLUMN = "image"
CSV_LABEL_COLUMN = "label"


class InputError(ValueError):
    """Wrong arguments: a missing SOURCE, an unreadable CSV, an OUT inside SOURCE."""


@dataclass
class LabelSource:
    """Source of an image's labels: one label map file, or a folder of per-structure masks."""

    path: Path
    is_mask_folder: bool = False


@dataclass
class LabelInputs:
    """Everything passed with ``--labels`` (or CSV label columns), before matching."""

    by_key: dict[str, LabelSource] = field(default_factory=dict)
    by_image_path: dict[Path, LabelSource] = field(default_factory=dict)
    seg_paths: list[Path] = field(default_factory=list)
    single: LabelSource | None = None


def check_source_and_out(source: Path, out: Path, val_fraction: float, manifest_name: str = "manifest.json") -> None:
    """Raise ``InputError`` unless SOURCE exists, OUT is outside it and reusable, and the fraction is valid.

    OUT may be new, empty, or a previous output (it contains ``manifest_name``).
    """
    source_path, out_path = source.resolve(), out.resolve()
    if not source_path.exists():
        raise InputError(f"SOURCE {source} not found")
    if source_path.is_dir() and (out_path == source_path or source_path in out_path.parents):
        raise InputError(f"--out {out} is inside SOURCE; SOURCE is never written to, choose a folder outside it")
    if out_path.exists() and any(out_path.iterdir()) and not (out_path / manifest_name).exists():
        raise InputError(f"--out {out} is not empty and contains no {manifest_name}; choose an empty or new folder")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")


def walk_files(root: Path) -> list[Path]:
    """Return the regular files under ``root`` (or ``root`` itself), sorted, without hidden files."""
    if root.is_file():
        return [root]
    files = []
    for path in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.is_file():
            files.append(path)
    return files


def read_csv_list(csv_path: Path) -> list[tuple[Path, Path | None]]:
    """Read ``image,label`` rows (paths relative to the CSV's folder); ``label`` may be empty."""
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{csv_path}: cannot read CSV ({exc})") from exc
    if not rows or CSV_IMAGE_COLUMN not in rows[0]:
        raise InputError(
            f"{csv_path}: expected a header row with an '{CSV_IMAGE_COLUMN}' column "
            f"(and optionally '{CSV_LABEL_COLUMN}'), paths relative to the CSV file"
        )
    pairs = []
    for number, row in enumerate(rows, start=2):
        image_text = (row.get(CSV_IMAGE_COLUMN) or "").strip()
        if not image_text:
            raise InputError(f"{csv_path}: line {number} has an empty '{CSV_IMAGE_COLUMN}' value")
        image = (csv_path.parent / image_text).resolve()
        label_text = (row.get(CSV_LABEL_COLUMN) or "").strip()
        label = (csv_path.parent / label_text).resolve() if label_text else None
        for what, path in (("image", image), ("label", label)):
            if path is not None and not path.exists():
                raise InputError(f"{csv_path}: line {number}: {what} {path} not found")
        pairs.append((image, label))
    return pairs


def label_source_for(path: Path) -> LabelSource:
    return LabelSource(path, is_mask_folder=path.is_dir())


def collect_labels(labels: Path | None) -> LabelInputs:
    """Index ``--labels``: a label file, a DICOM SEG, a CSV, or a folder following the naming rule."""
    inputs = LabelInputs()
    if labels is None:
        return inputs
    if not labels.exists():
        raise InputError(f"--labels {labels}: not found")
    if labels.is_file():
        if labels.suffix.lower() == ".csv":
            for image, label in read_csv_list(labels):
                if label is not None:
                    inputs.by_image_path[image] = label_source_for(label)
        elif is_research_volume(labels):
            inputs.single = LabelSource(labels)
        else:
            inputs.seg_paths.append(labels)
        return inputs
    for child in sorted(labels.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            inputs.by_key.setdefault(child.name, LabelSource(child, is_mask_folder=True))
            inputs.seg_paths.extend(p for p in walk_files(child) if not is_research_volume(p))
        elif is_research_volume(child):
            inputs.by_key.setdefault(research_stem(child), LabelSource(child))
        else:
            inputs.seg_paths.append(child)
    if not inputs.by_key and not inputs.seg_paths:
        raise InputError(f"--labels {labels}: folder contains no label files (NIfTI, NRRD, MHA or DICOM SEG)")
    # A folder whose files match no image by name is read as per-structure masks of a single image.
    inputs.single = LabelSource(labels, is_mask_folder=True)
    return inputs


def match_by_name(key: str, inputs: LabelInputs) -> LabelSource | None:
    for suffix in LABEL_SUFFIXES:
        source = inputs.by_key.get(key + suffix)
        if source is not None:
            return source
    return None


def mask_files(folder: Path, exclude: set[Path]) -> list[Path]:
    """Volume files in a per-structure mask folder, minus the image itself."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and is_research_volume(p) and p.resolve() not in exclude]
