"""Write prepared images, label maps, ``datalist.json`` and ``manifest.json``."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MANIFEST_NAME = "manifest.json"
DATALIST_NAME = "datalist.json"


def write_nifti(path: Path, array: np.ndarray, affine_lps: np.ndarray) -> None:
    """Save ``array`` (indexed x, y, z) as NIfTI with the RAS affine; no header text is copied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine_ras = _RAS_FROM_LPS @ affine_lps
    image = nib.Nifti1Image(np.asarray(array), affine_ras)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine_ras, code=1)
    image.set_sform(affine_ras, code=1)
    nib.save(image, str(path))


def write_png(path: Path, array_xy_rgb: np.ndarray) -> None:
    """Save an 8-bit colour image indexed (x, y, channel) as PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(np.swapaxes(array_xy_rgb, 0, 1))).save(path)


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(descriptor, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(temporary, path)


def split_by_patient(patient_of_case: dict[str, str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign each case to ``training`` or ``validation`` so that a patient's cases stay together.

    Patients are shuffled with ``seed`` after sorting, so the split depends only on the seed and
    the pseudonymous IDs. At least one patient stays in training; a single patient gives no
    validation cases.
    """
    patients = sorted(set(patient_of_case.values()))
    random.Random(seed).shuffle(patients)
    n_validation = int(round(val_fraction * len(patients)))
    n_validation = min(n_validation, max(0, len(patients) - 1))
    validation = set(patients[:n_validation])
    return {case: ("validation" if patient in validation else "training") for case, patient in patient_of_case.items()}
