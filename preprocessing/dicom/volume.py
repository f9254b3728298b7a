"""Turn a checked group of DICOM files into an image array with its geometry."""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import numpy as np
from pydicom.uid import UID

from preprocessing.dicom.geometry import plan_stack
from preprocessing.dicom.grouping import SeriesGroup
from preprocessing.dicom.headers import DicomFile
from preprocessing.dicom.pixels import (
    compact_dtype,
    compact_integer_dtype,
    decode_frames,
    integer_rescale,
    physical_values,
)
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


# A series is decoded in worker processes only from this many files on, because each worker
# re-parses its files and sends the decoded arrays back through a pipe.
MIN_FILES_FOR_WORKERS = 8


def _decode_in_worker(dicom_file: DicomFile) -> np.ndarray | tuple[Reason, str]:
    """Decode one file in a worker; a rejection comes back as (reason, message).

    ``Rejection`` cannot be unpickled (its constructor takes two arguments, its ``args`` hold one).
    """
    try:
        return decode_frames(dicom_file)
    except Rejection as rejection:
        return rejection.reason, rejection.message


def _frame_arrays(group_files: list[DicomFile], decode_pool: Executor | None,
                  processes: int = 1) -> dict[str, np.ndarray]:
    """Decode every file of a group, sharing compressed series of at least ``MIN_FILES_FOR_WORKERS`` files.

    With ``decode_pool``, this process decodes every ``processes``-th file and the pool's
    ``processes - 1`` workers decode the others at the same time. Uncompressed pixel data is always
    read in this process, because reading it costs less than sending it back from a worker.
    """
    compressed = UID(group_files[0].transfer_syntax).is_compressed
    if decode_pool is None or processes < 2 or not compressed or len(group_files) < MIN_FILES_FOR_WORKERS:
        return {f.rel_path: decode_frames(f) for f in group_files}
    own_files = group_files[::processes]
    pool_files = [f for index, f in enumerate(group_files) if index % processes]
    # Workers re-read their files, so the parsed headers are not pickled. They are released here,
    # as decode_frames would release them.
    jobs = [replace(f, header_dataset=None) for f in pool_files]
    for f in pool_files:
        f.header_dataset = None
    # One task per worker. The pool's feeder thread needs the GIL, which this process holds while
    # pylibjpeg decodes a slice, so a stream of small tasks would leave the workers waiting.
    chunk_size = -(-len(jobs) // (processes - 1))
    results = decode_pool.map(_decode_in_worker, jobs, chunksize=chunk_size)
    decoded = {f.rel_path: decode_frames(f) for f in own_files}
    for dicom_file, result in zip(pool_files, results):
        if isinstance(result, tuple):
            raise Rejection(*result)
        decoded[dicom_file.rel_path] = result
    return {f.rel_path: decoded[f.rel_path] for f in group_files}


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


def _integer_stack(stored_slices: list[np.ndarray], rescales: list[tuple[int, int]]) -> np.ndarray | None:
    """Write sign * stored + offset of every slice into one (slice, row, column) array of the compact type.

    The type comes from each slice's stored minimum and maximum, so no wider copy of the volume is
    made. The arithmetic runs in that type: operands wrap modulo 2**bits, and the result is exact
    because every true value fits the type. Returns None when the values need float32, which the
    caller handles on the general path.
    """
    low = high = None
    for stored, (sign, offset) in zip(stored_slices, rescales):
        first, last = int(stored.min()), int(stored.max())
        slice_low, slice_high = (offset - last, offset - first) if sign < 0 else (first + offset, last + offset)
        low = slice_low if low is None else min(low, slice_low)
        high = slice_high if high is None else max(high, slice_high)
    dtype = compact_integer_dtype(low, high)
    if dtype.kind == "f":
        return None
    stack = np.empty((len(stored_slices),) + stored_slices[0].shape, dtype=dtype)
    for target, stored, (sign, offset) in zip(stack, stored_slices, rescales):
        wrapped_offset = np.array(offset, dtype=np.int64).astype(dtype)
        if sign < 0:
            np.subtract(wrapped_offset, stored, out=target, dtype=dtype, casting="unsafe")
        else:
            np.add(stored, wrapped_offset, out=target, dtype=dtype, casting="unsafe")
    return stack


def build_volume(group: SeriesGroup, decode_pool: Executor | None = None, processes: int = 1) -> BuiltImage:
    """Stack a group into a 3D volume in physical units; raise ``Rejection`` when it is inconsistent.

    ``decode_pool``, a pool of ``processes - 1`` worker processes, decodes large compressed series
    together with this process. The volume is the same without it.
    """
    frames = [(f, frame) for f in group.files for frame in f.frames]
    geometry = plan_stack(frames, group.label)
    decoded = _frame_arrays(group.files, decode_pool, processes)
    colour = _is_colour(group.first)
    stored_slices = []
    for dicom_file, frame in geometry.frames:
        stored = decoded[dicom_file.rel_path][frame.frame_index or 0]
        if stored.shape[:2] != (group.first.rows, group.first.columns):
            raise Rejection(
                Reason.INCONSISTENT_SLICES,
                f"{dicom_file.rel_path}: decoded frame is {stored.shape[:2]}, header says "
                f"{group.first.rows}x{group.first.columns}; re-export the series",
            )
        stored_slices.append(stored)
    del decoded
    inverted_any = False
    if colour:
        stack = np.stack(stored_slices)  # (slice, row, column, channel)
        array = np.moveaxis(stack, (0, 1, 2), (2, 1, 0))
    else:
        rescales = [integer_rescale(stored, dicom_file, frame)
                    for stored, (dicom_file, frame) in zip(stored_slices, geometry.frames)]
        stack = None
        if all(rescale is not None for rescale in rescales):
            stack = _integer_stack(stored_slices, rescales)
            inverted_any = any(sign < 0 for sign, _ in rescales)
        if stack is None:
            slices = []
            for stored, (dicom_file, frame) in zip(stored_slices, geometry.frames):
                values, inverted = physical_values(stored, dicom_file, frame)
                inverted_any |= inverted
                slices.append(values)
            stack = np.stack(slices)  # (slice, row, column)
            stack = stack.astype(compact_dtype(stack))
        array = stack.transpose(2, 1, 0)
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
