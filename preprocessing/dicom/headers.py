"""Read DICOM headers (no pixel decoding) and describe each file and frame.

Geometry follows DICOM patient coordinates (LPS, millimetres). ``orientation`` holds
ImageOrientationPatient: the first three values are the direction of increasing column index
(along a row), the last three the direction of increasing row index.
"""

from __future__ import annotations

import gzip
import io
import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

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
    # Bits per entry of the Modality LUT Sequence, when the file maps stored values through one.
    modality_lut_bits: int | None = None
    # (kind, value) of every identifier in the header, for the PHI guard's site-local list; never written out.
    identifiers: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    # The parsed header with its pixel data deferred, reused by the decoder so each file is parsed once.
    # NOTE: kept until the file is decoded. It takes a few kilobytes per file, because pixel data over
    # 1024 bytes stays deferred. Gzipped files are re-read instead.
    header_dataset: pydicom.Dataset | None = field(default=None, repr=False, compare=False)

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


def _dcmread_noting_early_end(source: io.BytesIO | Path, **kwargs) -> tuple[pydicom.Dataset, bool]:
    """Call ``pydicom.dcmread`` and report whether the file ended inside an element.

    pydicom drops the element it was reading when the file ends early and only warns, so a cut-short
    file would otherwise look like a complete one without that element. The warnings are re-issued.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(source, **kwargs)
    ended_early = False
    for warning in caught:
        ended_early |= str(warning.message).startswith("End of file reached")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ds, ended_early


def read_dataset_noting_early_end(path: Path, *, headers_only: bool) -> tuple[pydicom.Dataset, bool, bool]:
    """Like ``read_dataset``, and also return whether the file ended inside an element."""
    source, is_gzip = open_dicom_bytes(path)
    kwargs = {"defer_size": 1024} if headers_only else {}
    try:
        ds, ended_early = _dcmread_noting_early_end(source, **kwargs)
    except InvalidDicomError:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        try:
            ds, ended_early = _dcmread_noting_early_end(source, force=True, **kwargs)
        except Exception as exc:  # pydicom raises many types on arbitrary bytes
            raise Rejection(Reason.NOT_DICOM, f"{path.name}: not a DICOM file ({exc.__class__.__name__}); skipped") from exc
        if not _looks_like_dataset(ds):
            raise Rejection(Reason.NOT_DICOM, f"{path.name}: not a DICOM file; skipped")
    except Exception as exc:
        raise Rejection(
            Reason.UNREADABLE_FILE,
            f"{path.name}: DICOM header cannot be parsed ({exc}); re-export the file from the archive",
        ) from exc
    return ds, is_gzip, ended_early


def read_dataset(path: Path, *, headers_only: bool) -> tuple[pydicom.Dataset, bool]:
    """Parse ``path`` as DICOM, with or without a preamble; raise ``Rejection`` when it is not DICOM.

    With ``headers_only`` large values (pixel data) are deferred: their length and offset are read
    but not their bytes.
    """
    ds, is_gzip, _ = read_dataset_noting_early_end(path, headers_only=headers_only)
    return ds, is_gzip


def transfer_syntax_of(ds: pydicom.Dataset) -> str:
    """TransferSyntaxUID from the file meta, else the encoding pydicom found when it read a file without one."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return str(meta.TransferSyntaxUID)
    is_implicit_vr, is_little_endian = getattr(ds, "original_encoding", (None, None))
    if is_little_endian is False:
        return ExplicitVRBigEndian
    if is_implicit_vr is False:
        return ExplicitVRLittleEndian
    return ImplicitVRLittleEndian


def _float_list(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
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
    slope = _optional_float(ds.get("RescaleSlope"))
    if slope is None:
        # RT Dose stores its scale to dose units as DoseGridScaling instead of RescaleSlope.
        slope = _optional_float(ds.get("DoseGridScaling"))
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
        rescale_slope=slope,
        rescale_intercept=_optional_float(ds.get("RescaleIntercept")),
    )


def _grid_frame_positions(ds: pydicom.Dataset, frame: FrameInfo, n_frames: int) -> list[np.ndarray] | None:
    """Frame positions of a multi-frame RT Dose from GridFrameOffsetVector, or None without one.

    The offsets are distances in mm along the slice normal from the plane of the first frame
    (PS3.3 C.8.8.3.2). The older absolute form, allowed for axial planes only, contains the normal
    coordinate of each plane and starts at that of ImagePositionPatient. Differences to the first
    offset therefore give the positions for both forms.
    """
    offsets = _float_list(ds.get("GridFrameOffsetVector"), n_frames)
    if offsets is None or frame.position_lps is None or frame.orientation is None:
        return None
    normal = np.cross(frame.orientation[:3], frame.orientation[3:])
    norm = np.linalg.norm(normal)
    if norm == 0:
        return None
    normal = normal / norm
    return [frame.position_lps + (offset - offsets[0]) * normal for offset in offsets]


def _number_of_frames(ds: pydicom.Dataset, path: Path) -> int:
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        n_frames = int(value)
    except (TypeError, ValueError):
        n_frames = 0
    if n_frames < 1:
        raise Rejection(
            Reason.UNREADABLE_FILE,
            f"{path.name}: NumberOfFrames {str(value)!r} is not a positive integer; re-export the file from the archive",
        )
    return n_frames


# Header fields the PHI guard records (as keyed hashes, at the site) and the kind each one is.
IDENTIFIER_TAGS = (
    ("PatientName", "patient_name"),
    ("PatientID", "patient_id"),
    ("OtherPatientIDs", "patient_id"),
    ("AccessionNumber", "accession_number"),
    ("PatientBirthDate", "birth_date"),
    ("InstitutionName", "institution"),
)


def header_identifiers(ds: pydicom.Dataset) -> tuple[tuple[str, str], ...]:
    """The identifying values of a header, as (kind, text) pairs; multi-valued elements give one pair each."""
    found = []
    for keyword, kind in IDENTIFIER_TAGS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        found.extend((kind, str(v)) for v in values if str(v).strip())
    return tuple(found)


def _modality_lut_bits(ds: pydicom.Dataset) -> int | None:
    """Bits per entry of the Modality LUT Sequence (third LUTDescriptor value), or None without one."""
    item = _first_item(ds, "ModalityLUTSequence")
    if item is None or "LUTData" not in item:
        return None
    return int(item.LUTDescriptor[2])  # an invalid descriptor makes read_header reject the file


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
    ``file_size`` is None where element offsets are not file offsets (gzipped or deflated files).
    """
    # A deferred element keeps its length and file offset, so the pixel bytes are read once, when decoded.
    # Offsets of a deflated file count bytes of the inflated stream, so its value is read here instead.
    element = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=file_size is not None)
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
    """Raise ``Rejection`` when no installed plugin decodes ``transfer_syntax``.

    The two cases get different advice. pydicom has no decoder at all for some transfer syntaxes,
    such as the retired JPEG processes 6/8 and 10/12, so only decompressing the file helps. For the
    others, a missing plugin can be installed.
    """
    from pydicom.pixels import get_decoder

    uid = UID(transfer_syntax)
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise Rejection(
            Reason.NO_DECODER,
            f"{path.name}: pydicom {pydicom.__version__} has no decoder for transfer syntax {uid.name} ({uid}) "
            "with any plugin; decompress the file with dcmdjpeg or gdcmconv before preparing it",
        ) from None
    if not decoder.is_available:
        plugins = "; ".join(decoder.missing_dependencies) or "a pydicom pixel data plugin"
        raise Rejection(
            Reason.NO_DECODER,
            f"{path.name}: no decoder installed for transfer syntax {uid.name} ({uid}); install one of: {plugins}; "
            "or decompress the file with dcmdjpeg or gdcmconv",
        )


def read_header(path: Path, rel_path: str) -> DicomFile:
    """Read one file's header; raise ``Rejection`` for non-images, unreadable or truncated files."""
    ds, is_gzip, ended_early = read_dataset_noting_early_end(path, headers_only=True)
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
    transfer_syntax = transfer_syntax_of(ds)
    if _PIXEL_DATA_TAG not in ds and ended_early:
        # A compressed transfer syntax implies encapsulated pixel data, even when pydicom kept no element.
        if "Rows" in ds or UID(transfer_syntax).is_compressed:
            raise Rejection(
                Reason.TRUNCATED_PIXEL_DATA,
                f"{path.name}: the file ends before its pixel data is complete - file truncated, "
                "re-export it from the archive",
            )
        raise Rejection(
            Reason.UNREADABLE_FILE,
            f"{path.name}: the file ends inside a data element - file truncated, re-export it from the archive",
        )
    if _PIXEL_DATA_TAG not in ds:
        name = UID(sop_class).name if sop_class else "unknown SOP class"
        raise Rejection(Reason.NO_PIXEL_DATA, f"{path.name}: {name} object has no pixel data, so it is not an image")

    n_frames = _number_of_frames(ds, path)
    if not UID(transfer_syntax).is_compressed:
        on_disk = not is_gzip and transfer_syntax != DeflatedExplicitVRLittleEndian
        _check_pixel_length(ds, path, path.stat().st_size if on_disk else None)
    if sop_class != SEG_STORAGE:
        check_decoder(transfer_syntax, path)

    is_enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if is_enhanced:
        frames = _enhanced_frames(ds, n_frames)
    elif n_frames == 1:
        frames = [_single_frame(ds)]
    else:
        # A classic multi-frame image (cine, ultrasound loop) has no per-frame position, except
        # RT Dose, whose frames are planes at GridFrameOffsetVector.
        base = _single_frame(ds)
        positions = _grid_frame_positions(ds, base, n_frames) or [None] * n_frames
        frames = [replace(base, frame_index=i, position_lps=positions[i]) for i in range(n_frames)]
    # Values are stripped because some writers pad them with extra spaces ('DERIVED ').
    image_type = tuple(str(v).strip().upper() for v in (ds.get("ImageType") or []))
    if not image_type and is_enhanced:
        image_type = tuple(str(v).strip().upper() for v in (ds.get("FrameType") or []))
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
            header_dataset=None if is_gzip else ds,
            modality_lut_bits=_modality_lut_bits(ds),
            identifiers=header_identifiers(ds),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise Rejection(
            Reason.UNREADABLE_FILE,
            f"{path.name}: required image attribute missing or invalid ({exc}); re-export the file from the archive",
        ) from exc
