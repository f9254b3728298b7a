"""Folders of already-cut labelled tiles: one sub-folder per class, image files inside."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from preprocessing.reasons import Reason, Rejection
from preprocessing.wsi.resolution import FLOAT_SLACK, MPP_TOLERANCE, PLAUSIBLE_MPP

TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# "01_TUMOR" -> "TUMOR": a leading number orders class folders and is not part of the class name.
_ORDER_PREFIX = re.compile(r"^\d+[_\-\s]+")


def class_name_from_folder(folder_name: str) -> str:
    return _ORDER_PREFIX.sub("", folder_name) or folder_name


def find_tile_folders(source: Path) -> dict[str, list[Path]]:
    """Class name -> tile files, for each sub-folder of ``source`` holding image files."""
    classes: dict[str, list[Path]] = {}
    if not source.is_dir():
        return classes
    for child in sorted(source.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            files = [p for p in sorted(child.iterdir()) if p.is_file() and p.suffix.lower() in TILE_SUFFIXES]
            if files:
                classes.setdefault(class_name_from_folder(child.name), []).extend(files)
    return classes


def _file_mpp(image: Image.Image) -> float | None:
    dpi = image.info.get("dpi")
    if dpi and dpi[0]:
        mpp = 25400.0 / float(dpi[0])
        if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            return mpp
    return None


@dataclass
class PreparedTile:
    """A tile converted to RGB at the target mpp."""

    pixels: np.ndarray
    mpp: float
    mpp_source: str
    resampled: bool


def load_tile(path: Path, target_mpp: float, assume_mpp: float | None) -> PreparedTile:
    """Read a tile as RGB and resample it to ``target_mpp`` when its mpp differs by more than the tolerance."""
    try:
        with Image.open(path) as image:
            image.load()
            mpp = _file_mpp(image)
            source = "image resolution (dpi)"
            if mpp is None and assume_mpp is not None:  # The file's own resolution wins when it has one.
                mpp, source = assume_mpp, "--assume-mpp"
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise Rejection(Reason.UNREADABLE_TILE, f"{path.name}: cannot be read as an image ({exc})") from exc
    if mpp is None:
        raise Rejection(
            Reason.NO_MPP,
            f"{path.name} has no usable mpp (no resolution, or the 72 dpi default); "
            "pass --assume-mpp with the resolution the tiles were cut at",
        )
    if abs(mpp - target_mpp) <= MPP_TOLERANCE * target_mpp + FLOAT_SLACK:
        return PreparedTile(np.asarray(rgb), mpp, source, False)
    size = (max(1, round(rgb.width * mpp / target_mpp)), max(1, round(rgb.height * mpp / target_mpp)))
    return PreparedTile(np.asarray(rgb.resize(size, Image.Resampling.BILINEAR)), target_mpp, source, True)
