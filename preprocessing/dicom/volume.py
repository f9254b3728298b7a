"""Turn a checked group of DICOM files into an image array with its geometry."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from preprocessing.dicom.geometry import plan_stack
from preprocessing.dicom.grouping import SeriesGroup
from preprocessing.dicom.headers import DicomFile
from preprocessing.dicom.pixels import compact_dtype, decode_frames, physical_values
from preprocessing.reasons import Reason, Rejection


@dataclass
class BuiltImage:
    """A decoded image ready to be written.

    ``array`` is indexed (x, y[, z][, channel]) = (column, row[, slice][, RGB]), and
    ``affine_lps`` maps (column, row, slice) indices to LPS millimetres.
    """

    kind: str  # "volume" or "image2d"
    array: np.ndarray
    affine_lps: np.ndarray
    spacing_mm: list[float] | None
    spacing_source: dict[str, str]
    modality: str
    files: list[DicomFile]
    intensity: dict
    notes: list[str] = field(default_factory=list)

    @property
    def series_uid(self) -> str | None:
        return self.files[0].series_uid

    def content_digest(self) -> str:
        """SHA-256 of the pixel values and geometry, a stable identity for series without UIDs."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.array).tobytes())
        digest.update(np.round(self.affine_lps, 4).tobytes())
        return digest.hexdigest()


def _is_colour(dicom_file: DicomFile) -> bool:
    return dicom_file.samples_per_pixel == 3 or dicom_file.photometric == "PALETTE COLOR"


def _frame_arrays(group_files: list[DicomFile]) -> dict[str, np.ndarray]:
    return {f.rel_path: decode_frames(f) for f in group_files}


def _intensity_summary(slopes: set, intercepts: set, inverted: bool, colour: bool) -> dict:
    if colour:
        return {"colour": True, "rescale": "none"}
    if slopes == {None} and intercepts == {None}:
        rescale = "none (no RescaleSlope/RescaleIntercept)"
    elif len(slopes) > 1 or len(intercepts) > 1:
        rescale = "per slice"
    else:
        rescale = f"slope {next(iter(slopes)) or 1.0}, intercept {next(iter(intercepts)) or 0.0}"
    return {"colour": False, "rescale": rescale, "monochrome1_inverted": inverted}


def build_volume(group: SeriesGroup) -> BuiltImage:
    """Stack a group into a 3D volume in physical units; raise ``Rejection`` when it is inconsistent."""
    frames = [(f, frame) for f in group.files for frame in f.frames]
    geometry = plan_stack(frames, group.label)
    decoded = _frame_arrays(group.files)
    colour = _is_colour(group.first)
    slices = []
    inverted_any = False
    for dicom_file, frame in geometry.frames:
        stored = decoded[dicom_file.rel_path][frame.frame_index or 0]
        if stored.shape[:2] != (group.first.rows, group.first.columns):
            raise Rejection(
                Reason.INCONSISTENT_SLICES,
                f"{dicom_file.rel_path}: decoded frame is {stored.shape[:2]}, header says "
                f"{group.first.rows}x{group.first.columns}; re-export the series",
            )
        if colour:
            slices.append(stored)
        else:
            values, inverted = physical_values(stored, dicom_file, frame)
            inverted_any |= inverted
            slices.append(values)
    stack = np.stack(slices)  # (slice, row, column[, channel])
    if colour:
        array = np.moveaxis(stack, (0, 1, 2), (2, 1, 0))
    else:
        array = stack.transpose(2, 1, 0)
        array = array.astype(compact_dtype(array))
    slopes = {frame.rescale_slope for _, frame in geometry.frames}
    intercepts = {frame.rescale_intercept for _, frame in geometry.frames}
    notes = list(geometry.notes)
    if group.split_note:
        notes.append(group.split_note)
    return BuiltImage(
        kind="volume",
        array=array,
        affine_lps=geometry.affine_lps,
        spacing_mm=[float(s) for s in geometry.spacing_xyz_mm],
        spacing_source={"in_plane": geometry.in_plane_spacing_source, "slice": geometry.slice_spacing_source},
        modality=group.first.modality,
        files=group.files,
        intensity=_intensity_summary(slopes, intercepts, inverted_any, colour),
        notes=notes,
    )


def build_image2d(dicom_file: DicomFile) -> BuiltImage:
    """Decode a single-frame file as a 2D image (radiograph, secondary capture, ultrasound frame)."""
    stored = decode_frames(dicom_file)[0]
    frame = dicom_file.frames[0]
    colour = _is_colour(dicom_file)
    if colour:
        array = np.swapaxes(stored, 0, 1)
        inverted = False
    else:
        values, inverted = physical_values(stored, dicom_file, frame)
        array = values.T.astype(compact_dtype(values))
    affine = np.eye(4)
    spacing = None
    if frame.pixel_spacing_rc_mm is not None:
        row_spacing, col_spacing = frame.pixel_spacing_rc_mm
        affine[0, 0], affine[1, 1] = col_spacing, row_spacing
        spacing = [col_spacing, row_spacing]
    return BuiltImage(
        kind="image2d",
        array=array,
        affine_lps=affine,
        spacing_mm=spacing,
        spacing_source={"in_plane": frame.pixel_spacing_source or "unknown (no PixelSpacing)"},
        modality=dicom_file.modality,
        files=[dicom_file],
        intensity=_intensity_summary({frame.rescale_slope}, {frame.rescale_intercept}, inverted, colour),
    )
