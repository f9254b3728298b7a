"""Order the frames of one stack along the slice normal and derive its voxel-to-patient affine.

Voxel index order is (i, j, k) = (column, row, slice); the affine maps it to DICOM patient
coordinates (LPS, millimetres) with voxel centres at integer indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from preprocessing.dicom.headers import DicomFile, FrameInfo
from preprocessing.reasons import Reason, Rejection

# Positions closer than this along the normal are the same slice location.
SAME_POSITION_MM = 0.01
# A step may deviate from the mean step by this fraction (or SAME_POSITION_MM, if larger)
# and still count as uniform spacing. Rounded positions in real headers jitter by about 1e-3 mm.
SPACING_TOLERANCE = 0.01

Frame = tuple[DicomFile, FrameInfo]


@dataclass
class StackGeometry:
    """Frames sorted along the slice normal, and the geometry they share."""

    frames: list[Frame]
    affine_lps: np.ndarray
    spacing_xyz_mm: tuple[float, float, float]
    in_plane_spacing_source: str
    slice_spacing_source: str
    notes: list[str] = field(default_factory=list)


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal of the image plane: cross product of the row and column direction cosines."""
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _format_mm(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _single_slice_spacing(frame: FrameInfo, dicom_file: DicomFile) -> tuple[float, str]:
    if dicom_file.spacing_between_slices_mm and dicom_file.spacing_between_slices_mm > 0:
        return dicom_file.spacing_between_slices_mm, "SpacingBetweenSlices (single slice)"
    if frame.slice_thickness_mm and frame.slice_thickness_mm > 0:
        return frame.slice_thickness_mm, "SliceThickness (single slice)"
    return 1.0, "default 1 mm (single slice without SliceThickness)"


def _reject_repeated_positions(label: str, counts: np.ndarray, n_locations: int) -> None:
    if n_locations >= 2 and np.all(counts == counts[0]):
        raise Rejection(
            Reason.FOUR_D,
            f"{label}: {counts[0]} frames at each of {n_locations} slice positions - a 4D series "
            "(diffusion, perfusion, fMRI or multi-echo); 4D series are not supported as training volumes",
        )
    repeated = int(np.sum(counts > 1))
    raise Rejection(
        Reason.DUPLICATE_POSITION,
        f"{label}: {repeated} slice position(s) occur more than once with different images; "
        "the stack is ambiguous. Export the series again or remove the duplicate images",
    )


def plan_stack(frames: list[Frame], label: str) -> StackGeometry:
    """Sort ``frames`` by the projection of ImagePositionPatient on the slice normal and check them.

    Raises ``Rejection`` for missing geometry, repeated positions (4D or duplicates), gaps,
    non-uniform spacing and gantry tilt: an inconsistent stack is never returned.
    """
    if any(f.position_lps is None or f.orientation is None for _, f in frames):
        raise Rejection(
            Reason.MISSING_GEOMETRY,
            f"{label}: ImagePositionPatient or ImageOrientationPatient missing, so slices cannot be placed in space",
        )
    first_file, first = frames[0]
    spacings = {f.pixel_spacing_rc_mm for _, f in frames}
    if first.pixel_spacing_rc_mm is None or len(spacings) != 1:
        raise Rejection(
            Reason.MISSING_GEOMETRY,
            f"{label}: PixelSpacing missing or different between slices; cannot build a volume",
        )
    orientation = first.orientation
    row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
    col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = slice_normal(orientation)
    row_spacing, col_spacing = first.pixel_spacing_rc_mm

    positions = np.array([f.position_lps for _, f in frames])
    projections = positions @ normal
    order = np.lexsort((positions[:, 2], positions[:, 1], positions[:, 0], projections))
    frames = [frames[i] for i in order]
    positions = positions[order]
    projections = projections[order]

    # Group equal slice locations to tell 4D series and duplicates apart.
    steps = np.diff(projections)
    new_location = np.concatenate([[True], steps > SAME_POSITION_MM])
    location_ids = np.cumsum(new_location) - 1
    counts = np.bincount(location_ids)
    if np.any(counts > 1):
        _reject_repeated_positions(label, counts, len(counts))

    notes: list[str] = []
    if len(frames) == 1:
        step, slice_source = _single_slice_spacing(first, first_file)
    else:
        step = (projections[-1] - projections[0]) / (len(frames) - 1)
        tolerance = max(SAME_POSITION_MM, SPACING_TOLERANCE * step)
        min_step = float(steps.min())
        if np.max(np.abs(steps - step)) > tolerance:
            ratios = steps / min_step
            if np.all(np.abs(ratios - np.round(ratios)) * min_step <= max(SAME_POSITION_MM, SPACING_TOLERANCE * min_step)):
                where = int(np.argmax(ratios))
                missing = int(round(ratios[where])) - 1
                raise Rejection(
                    Reason.SLICE_GAP,
                    f"{label}: {missing} slice(s) missing between positions {_format_mm(projections[where])} and "
                    f"{_format_mm(projections[where + 1])} mm along the normal (step {_format_mm(min_step)} mm "
                    f"elsewhere, gaps of {', '.join(_format_mm(s) for s in steps)} mm); "
                    "re-export the complete series from the archive",
                )
            raise Rejection(
                Reason.NON_UNIFORM_SPACING,
                f"{label}: slice spacing is not uniform (steps from {_format_mm(min_step)} to "
                f"{_format_mm(float(steps.max()))} mm); resample the series to a uniform spacing before preparing it",
            )
        slice_source = "ImagePositionPatient"
        # Any offset of a slice perpendicular to the normal means a sheared (tilted) stack.
        along = projections - projections[0]
        offsets = (positions - positions[0]) - np.outer(along, normal)
        off_plane = float(np.max(np.linalg.norm(offsets, axis=1)))
        if off_plane > max(SAME_POSITION_MM, SPACING_TOLERANCE * float(along[-1])):
            tilt_deg = math.degrees(math.atan2(float(np.linalg.norm(offsets[-1])), float(along[-1])))
            raise Rejection(
                Reason.GANTRY_TILT,
                f"{label}: slice positions are sheared by {tilt_deg:.2f} degrees relative to the slice normal "
                "(gantry tilt or shifted slices); resample the series to an orthogonal grid on the scanner "
                "or workstation before preparing it",
            )
        for tag_name, tag_value in (
            ("SpacingBetweenSlices", first_file.spacing_between_slices_mm),
            ("SliceThickness", first.slice_thickness_mm),
        ):
            if tag_value and abs(abs(tag_value) - step) > SPACING_TOLERANCE * step:
                notes.append(
                    f"{tag_name} {_format_mm(tag_value)} mm differs from the {_format_mm(step)} mm step between "
                    "slice positions; the positions were used"
                )

    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]
    return StackGeometry(
        frames=frames,
        affine_lps=affine,
        spacing_xyz_mm=(col_spacing, row_spacing, float(step)),
        in_plane_spacing_source=first.pixel_spacing_source or "unknown",
        slice_spacing_source=slice_source,
        notes=notes,
    )


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Convert a voxel-to-LPS affine into the voxel-to-RAS affine NIfTI stores."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
