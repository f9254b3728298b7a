"""Microns per pixel (mpp) of a slide and the pyramid level to read at a target mpp.

Coordinates: "level-0" means pixels of the full-resolution level; a level's downsample is taken per
axis from the level dimensions (level-0 size / level size), which need not be an integer or a power
of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from preprocessing.reasons import Reason, Rejection

# Plausible scan resolutions in µm/px: from high-NA 100x objectives to low-power overview scans.
# A TIFF default of 72 dpi (352.8 µm/px) or a 1/1 resolution without unit falls outside and is not
# taken as a resolution.
PLAUSIBLE_MPP = (0.05, 20.0)
# A level whose mpp is within this fraction of the target is read as is, without resampling.
MPP_TOLERANCE = 0.01
# Absorbs float rounding, so that exactly 1 % off (0.495 against 0.5) counts as within the tolerance.
FLOAT_SLACK = 1e-9

_UNIT_MICRONS = {"centimeter": 1.0e4, "inch": 25400.0, "millimeter": 1.0e3, "micrometer": 1.0}


@dataclass(frozen=True)
class Resolution:
    """Level-0 resolution of a slide and where it was read."""

    mpp_x: float
    mpp_y: float
    source: str


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level read for a target mpp, and whether tiles must be resampled."""

    level: int
    downsample_xy: tuple[float, float]
    level_mpp_xy: tuple[float, float]
    effective_mpp_xy: tuple[float, float]
    resample: bool


def _plausible(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_resolution(properties: dict, name: str, assume_mpp: float | None = None) -> Resolution:
    """Return the slide's level-0 mpp from OpenSlide properties, or ``assume_mpp`` when it has no usable one.

    A plausible value in the slide always wins over ``assume_mpp``, so one option for a folder fills
    in the slides that lack a resolution without changing the others. Raises ``Rejection``
    (``no_mpp``) when no plausible value exists and ``assume_mpp`` is not given; it never guesses.
    """
    try:
        return _slide_resolution(properties, name)
    except Rejection:
        if assume_mpp is None:
            raise
        return Resolution(assume_mpp, assume_mpp, "--assume-mpp")


def _slide_resolution(properties: dict, name: str) -> Resolution:
    found = []
    mpp_x, mpp_y = _float(properties.get("openslide.mpp-x")), _float(properties.get("openslide.mpp-y"))
    vendor = properties.get("openslide.vendor", "unknown")
    if mpp_x is not None:
        if _plausible(mpp_x) and _plausible(mpp_y or mpp_x):
            return Resolution(mpp_x, mpp_y or mpp_x, f"openslide.mpp-x/y ({vendor} metadata)")
        found.append(f"openslide.mpp-x {mpp_x:g} µm/px")
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    resolution_x = _float(properties.get("tiff.XResolution"))
    resolution_y = _float(properties.get("tiff.YResolution")) or resolution_x
    if resolution_x and unit in _UNIT_MICRONS:
        tiff_x, tiff_y = _UNIT_MICRONS[unit] / resolution_x, _UNIT_MICRONS[unit] / resolution_y
        if _plausible(tiff_x) and _plausible(tiff_y):
            return Resolution(tiff_x, tiff_y, f"TIFF XResolution/YResolution ({unit})")
        found.append(f"TIFF resolution {resolution_x:g} per {unit} = {tiff_x:g} µm/px")
    elif resolution_x:
        found.append(f"TIFF resolution {resolution_x:g} with ResolutionUnit {unit.upper() or 'missing'}")
    detail = "; ".join(found) if found else "no mpp property and no TIFF resolution tags"
    raise Rejection(
        Reason.NO_MPP,
        f"{name} has no usable mpp ({detail}; plausible values are {PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} µm/px); "
        "pass --assume-mpp with the scanner's level-0 resolution for this slide",
    )


def choose_level(level_dimensions: list[tuple[int, int]], resolution: Resolution, target_mpp: float,
                 name: str) -> LevelChoice:
    """Pick the coarsest level whose mpp is at most the target plus ``MPP_TOLERANCE``.

    Raises ``Rejection`` (``resolution_too_coarse``) when even level 0 is coarser than that.
    """
    width0, height0 = level_dimensions[0]
    best: LevelChoice | None = None
    for level, (width, height) in enumerate(level_dimensions):
        downsample = (width0 / width, height0 / height)
        level_mpp = (resolution.mpp_x * downsample[0], resolution.mpp_y * downsample[1])
        if max(level_mpp) > target_mpp * (1.0 + MPP_TOLERANCE) + FLOAT_SLACK:
            continue
        if best is None or max(level_mpp) > max(best.level_mpp_xy):
            resample = any(abs(m - target_mpp) > MPP_TOLERANCE * target_mpp + FLOAT_SLACK for m in level_mpp)
            effective = (target_mpp, target_mpp) if resample else level_mpp
            best = LevelChoice(level, downsample, level_mpp, effective, resample)
    if best is None:
        raise Rejection(
            Reason.RESOLUTION_TOO_COARSE,
            f"{name}: level 0 is {resolution.mpp_x:.4g} µm/px, coarser than the target {target_mpp:g} µm/px; "
            "choose a larger --mpp (upsampling adds no detail)",
        )
    return best
