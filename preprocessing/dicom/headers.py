"""Read DICOM headers (no pixel decoding) and describe each file and frame.

Geometry follows DICOM patient coordinates (LPS, millimetres). ``orientation`` holds
ImageOrientationPatient: the first three values are the direction of increasing column index
(along a row), the last three the direction of increasing row index.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from preprocessing.reasons import Reason, Rejection

logger = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"

# Files with these suffixes are handled by the research-volume reader, not parsed as DICOM.
RESEARCH_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass
class FrameInfo:
    """One 2D frame: a single-frame file, or one frame of a multi-frame file."""

    frame_index: int | None
    position_lps: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing_rc_mm: tuple[float, float] | None
    pixel_spacing_source: str | None
    slice_thickness_mm: float | None
    rescale_slope: float | None
    rescale_intercept: float | None


@dataclass
class DicomFile:
    """Header facts of one DICOM file, enough to group, check and later decode it."""

    path: Path
    rel_path: str
    is_gzip: bool
    sop_class_uid: str
    sop_instance_uid: str | None
    series_uid: str | None
    study_uid: str | None
    patient_id: str | None
    frame_of_reference_uid: str | None
    modality: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    number_of_frames: int
    transfer_syntax: str
    spacing_between_slices_mm: float | None
    frames: list[FrameInfo] = field(default_factory=list)
    referenced_series_uids: tuple[str, ...] = ()
    is_enhanced: bool = False

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def is_derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0] == "DERIVED"

    @property
    def is_secondary(self) -> bool:
        return len(self.image_type) > 1 and self.image_type[1] == "SECONDARY"

    @property
    def is_mosaic(self) -> bool:
        return "MOSAIC" in self.image_type


def open_dicom_bytes(path: Path) -> tuple[io.BytesIO | Path, bool]:
    """Return something ``pydicom.dcmread`` accepts, transparently un-gzipping ``.gz`` files."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        with gzip.open(path, "rb") as fh:
            return io.BytesIO(fh.read()), True
    return path, False


def _looks_like_dataset(ds: pydicom.Dataset) -> bool:
    return "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds) or _PIXEL_DATA_TAG in ds


def read_dataset(path: Path, *, headers_only: bool) -> tuple[pydicom.Dataset, bool]:
    """Parse ``path`` as DICOM, with or without a preamble; raise ``Rejection`` when it is not DICOM.

    With ``headers_only`` large values (pixel data) are deferred: their length and offset are read
    but not their bytes.
    """
    source, is_gzip = open_dicom_bytes(path)
    kwargs = {"defer_size": 1024} if headers_only else {}
    try:
        ds = pydicom.dcmread(source, **kwargs)
    except InvalidDicomError:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        try:
            ds = pydicom.dcmread(source, force=True, **kwargs)
        except Exception as exc:  # pydicom raises many types on arbitrary bytes
            raise Rejection(Reason.NOT_DICOM, f"{path.name}: not a DICOM file ({exc.__class__.__name__}); skipped") from exc
        if not _looks_like_dataset(ds):
            raise Rejection(Reason.NOT_DICOM, f"{path.name}: not a DICOM file; skipped")
    except Exception as exc:
        raise Rejection(
            Reason.UNREADABLE_FILE,
            f"{path.name}: DICOM header cannot be parsed ({exc}); re-export the file from the archive",
        ) from exc
    return ds, is_gzip


def _float_list(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])]
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(np.isfinite(values)):
        return None
    return np.asarray(values, dtype=np.float64)


def _optional_float(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def _first_item(ds, keyword: str):
    seq = ds.get(keyword)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _from_groups(per_frame, shared, sequence: str, attribute: str):
    """Look up an attribute in a frame's functional group, falling back to the shared group."""
    for group in (per_frame, shared):
        if group is None:
            continue
        item = _first_item(group, sequence)
        if item is not None and attribute in item:
            return item.get(attribute)
    return None


def _spacing(value) -> tuple[float, float] | None:
    spacing = _float_list(value, 2)
    if spacing is None or np.any(spacing <= 0):
        return None
    return float(spacing[0]), float(spacing[1])


def _single_frame(ds: pydicom.Dataset) -> FrameInfo:
    spacing, source = _spacing(ds.get("PixelSpacing")), "PixelSpacing"
    if spacing is None:
        spacing, source = _spacing(ds.get("ImagerPixelSpacing")), "ImagerPixelSpacing"
    if spacing is None:
        source = None
    return FrameInfo(
        frame_index=None,
        position_lps=_float_list(ds.get("ImagePositionPatient"), 3),
        orientation=_float_list(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing_rc_mm=spacing,
        pixel_spacing_source=source,
        slice_thickness_mm=_optional_float(ds.get("SliceThickness")),
        rescale_slope=_optional_float(ds.get("RescaleSlope")),
        rescale_intercept=_optional_float(ds.get("RescaleIntercept")),
    )


def _enhanced_frames(ds: pydicom.Dataset, n_frames: int) -> list[FrameInfo]:
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    frames = []
    for index in range(n_frames):
        per_frame = per_frame_seq[index] if index < len(per_frame_seq) else None
        spacing = _spacing(_from_groups(per_frame, shared, "PixelMeasuresSequence", "PixelSpacing"))
        frames.append(
            FrameInfo(
                frame_index=index,
                position_lps=_float_list(
                    _from_groups(per_frame, shared, "PlanePositionSequence", "ImagePositionPatient"), 3
                ),
                orientation=_float_list(
                    _from_groups(per_frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ),
                pixel_spacing_rc_mm=spacing,
                pixel_spacing_source="PixelMeasuresSequence" if spacing else None,
                slice_thickness_mm=_optional_float(
                    _from_groups(per_frame, shared, "PixelMeasuresSequence", "SliceThickness")
                ),
                rescale_slope=_optional_float(
                    _from_groups(per_frame, shared, "PixelValueTransformationSequence", "RescaleSlope")
                ),
                rescale_intercept=_optional_float(
                    _from_groups(per_frame, shared, "PixelValueTransformationSequence", "RescaleIntercept")
                ),
            )
        )
    return frames


def _referenced_series(ds: pydicom.Dataset) -> tuple[str, ...]:
    uids = []
    for item in ds.get("ReferencedSeriesSequence") or []:
        if "SeriesInstanceUID" in item:
            uids.append(str(item.SeriesInstanceUID))
    return tuple(uids)


def _check_pixel_length(ds: pydicom.Dataset, path: Path, file_size: int | None) -> None:
    """Reject a native (uncompressed) file whose pixel data is shorter than its header promises.

    Encapsulated (compressed) pixel data has no fixed length; a cut-short stream fails when decoded.
    """
    element = ds.get_item(_PIXEL_DATA_TAG)
    length = getattr(element, "length", None)
    value_tell = getattr(element, "value_tell", None)
    if length is None:
        # Small or cut-short values are read at once: their length is what the file holds.
        value = element.value if hasattr(element, "value") else None
        if not isinstance(value, (bytes, bytearray)):
            return
        length = present = len(value)
    elif length == _UNDEFINED_LENGTH:
        return
    else:
        present = length
        if file_size is not None and value_tell is not None:
            present = min(length, max(0, file_size - value_tell))
    try:
        from pydicom.pixels.utils import get_expected_length

        expected = get_expected_length(ds, unit="bytes")
    except Exception:  # missing Rows/Columns etc: reported when decoding
        return
    if present < expected:
        raise Rejection(
            Reason.TRUNCATED_PIXEL_DATA,
            f"{path.name}: pixel data {present} of {expected} bytes - file truncated, re-export it from the archive",
        )


def check_decoder(transfer_syntax: str, path: Path) -> None:
    """Raise ``Rejection`` when no installed plugin decodes ``transfer_syntax``."""
    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid)
        available = decoder.is_available
    except NotImplementedError:
        available = False
    if not available:
        raise Rejection(
            Reason.NO_DECODER,
            f"{path.name}: no decoder installed for transfer syntax {uid.name} ({uid}); "
            "install pylibjpeg with its libjpeg/openjpeg/rle plugins (or python-gdcm), "
            "or decompress the file with dcmdjpeg or gdcmconv",
        )


def read_header(path: Path, rel_path: str) -> DicomFile:
    """Read one file's header; raise ``Rejection`` for non-images, unreadable or truncated files."""
    ds, is_gzip = read_dataset(path, headers_only=True)
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    if sop_class == DICOMDIR_STORAGE or "DirectoryRecordSequence" in ds:
        raise Rejection(Reason.DICOMDIR, f"{path.name}: DICOMDIR index file; the images it lists are read directly")
    if sop_class == RTSTRUCT_STORAGE:
        raise Rejection(
            Reason.RTSTRUCT_NOT_SUPPORTED,
            f"{path.name}: RTSTRUCT contours are not supported yet; export the structures as DICOM SEG or NIfTI masks",
        )
    if sop_class == WSI_STORAGE:
        raise Rejection(
            Reason.WHOLE_SLIDE_IMAGE,
            f"{path.name}: whole-slide microscopy image; prepare it with 'fedimaging prepare wsi'",
        )
    if _PIXEL_DATA_TAG not in ds:
        name = UID(sop_class).name if sop_class else "unknown SOP class"
        raise Rejection(Reason.NO_PIXEL_DATA, f"{path.name}: {name} object has no pixel data, so it is not an image")

    transfer_syntax = str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) if meta else "1.2.840.10008.1.2"
    if not UID(transfer_syntax).is_compressed:
        _check_pixel_length(ds, path, None if is_gzip else path.stat().st_size)
    if sop_class != SEG_STORAGE:
        check_decoder(transfer_syntax, path)

    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    is_enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if is_enhanced:
        frames = _enhanced_frames(ds, n_frames)
    elif n_frames == 1:
        frames = [_single_frame(ds)]
    else:
        # A classic multi-frame image (cine, ultrasound loop) has no per-frame position.
        base = _single_frame(ds)
        frames = [replace(base, frame_index=i, position_lps=None) for i in range(n_frames)]
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    if not image_type and is_enhanced:
        image_type = tuple(str(v).upper() for v in (ds.get("FrameType") or []))
    try:
        return DicomFile(
            path=path,
            rel_path=rel_path,
            is_gzip=is_gzip,
            sop_class_uid=sop_class,
            sop_instance_uid=str(ds.SOPInstanceUID) if "SOPInstanceUID" in ds else None,
            series_uid=str(ds.SeriesInstanceUID) if "SeriesInstanceUID" in ds else None,
            study_uid=str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None,
            patient_id=str(ds.PatientID) if ds.get("PatientID") else None,
            frame_of_reference_uid=str(ds.FrameOfReferenceUID) if "FrameOfReferenceUID" in ds else None,
            modality=str(ds.get("Modality") or "OT").upper(),
            image_type=image_type,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
            photometric=str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper(),
            bits_allocated=int(ds.BitsAllocated),
            bits_stored=int(ds.get("BitsStored") or ds.BitsAllocated),
            pixel_representation=int(ds.get("PixelRepresentation") or 0),
            number_of_frames=n_frames,
            transfer_syntax=transfer_syntax,
            spacing_between_slices_mm=_optional_float(ds.get("SpacingBetweenSlices")),
            frames=frames,
            referenced_series_uids=_referenced_series(ds),
            is_enhanced=is_enhanced,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise Rejection(
            Reason.UNREADABLE_FILE,
            f"{path.name}: required image attribute missing or invalid ({exc}); re-export the file from the archive",
        ) from exc
