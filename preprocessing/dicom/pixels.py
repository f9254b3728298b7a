"""Decode stored pixel values and convert them into physical values (HU for CT).

Stored values are sign-extended or masked to BitsStored, mapped through the Modality LUT Sequence
where a file has one, MONOCHROME1 is inverted once so that higher values are brighter, and
RescaleSlope/RescaleIntercept are applied per frame in float64. Palette colour images become
8-bit RGB.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from preprocessing.dicom.headers import DicomFile, FrameInfo, read_dataset
from preprocessing.reasons import Reason, Rejection


def _fix_unused_bits(array: np.ndarray, dicom_file: DicomFile) -> np.ndarray:
    """Clear (unsigned) or sign-extend (signed) the bits above BitsStored, which may hold junk.

    The operations run in the array's own type. Masking, XOR and subtraction wrap modulo 2**bits of
    that type, so the result equals the same steps in int64 cast back to the array's type.
    """
    bits = dicom_file.bits_stored
    if not np.issubdtype(array.dtype, np.integer) or bits >= array.dtype.itemsize * 8:
        return array
    scalar = array.dtype.type
    values = array & scalar((1 << bits) - 1)
    if dicom_file.pixel_representation == 1:
        sign_bit = scalar(1 << (bits - 1))
        values ^= sign_bit
        values -= sign_bit
    return values


_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Transfer syntaxes whose pixel data is stored as plain little endian values, read here without pydicom's decoder.
_NATIVE_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _read_native_greyscale(dicom_file: DicomFile, dataset: pydicom.Dataset) -> np.ndarray | None:
    """Read uncompressed greyscale pixel data straight from the file, or return None where pydicom must decode.

    The result equals ``dataset.pixel_array`` before pydicom's correction of unused bits, which
    ``_fix_unused_bits`` makes irrelevant: (rows, columns) for one frame, (frames, rows, columns) for
    more. Deferred pixel data is read from the file at the element's offset, so each file is opened
    once more for its pixels but parsed only once.
    """
    if (
        dicom_file.transfer_syntax not in _NATIVE_LITTLE_ENDIAN
        or dicom_file.samples_per_pixel != 1
        or dicom_file.photometric not in ("MONOCHROME1", "MONOCHROME2")
        or dicom_file.bits_allocated not in (8, 16, 32)
    ):
        return None
    element = dataset.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
        return None
    kind = "i" if dicom_file.pixel_representation == 1 else "u"
    dtype = np.dtype(f"<{kind}{dicom_file.bits_allocated // 8}")
    shape = (dicom_file.number_of_frames, dicom_file.rows, dicom_file.columns)
    count = shape[0] * shape[1] * shape[2]
    if element.value is None and element.value_tell is not None:
        array = np.fromfile(dicom_file.path, dtype=dtype, count=count, offset=element.value_tell)
    elif isinstance(element.value, (bytes, bytearray)):
        # A copy, because pydicom's arrays are writeable and this value is at most the deferral size (1 KiB).
        array = np.frombuffer(element.value, dtype=dtype, count=min(count, len(element.value) // dtype.itemsize)).copy()
    else:
        return None
    if array.size != count:
        return None  # shorter than the header promises: let pydicom raise its own error
    array = array.reshape(shape)
    return array[0] if dicom_file.number_of_frames == 1 else array


def _palette_to_rgb(indices: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    """Map palette indices to 8-bit RGB through the Palette Color Lookup Tables.

    pydicom 3.0.2 reads 16-bit LUT Data as little endian whatever the file's byte order, so the
    tables of a big endian file are swapped first (on this in-memory copy only). 16-bit entries
    keep their high byte, which maps both common encodings of 8-bit colours (c * 256, c * 257)
    back to c.
    """
    if dataset.original_encoding[1] is False:
        n_entries = int(dataset.RedPaletteColorLookupTableDescriptor[0]) or 1 << 16
        for colour in ("Red", "Green", "Blue", "Alpha"):
            keyword = f"{colour}PaletteColorLookupTableData"
            data = dataset.get(keyword)
            if isinstance(data, bytes) and len(data) == 2 * n_entries:
                dataset[keyword].value = np.frombuffer(data, dtype=">u2").astype("<u2").tobytes()
    rgb = apply_color_lut(indices, dataset)
    if rgb.dtype.itemsize > 1:
        rgb = (rgb >> (8 * rgb.dtype.itemsize - 8)).astype(np.uint8)
    return rgb


def decode_frames(dicom_file: DicomFile) -> np.ndarray:
    """Return stored values as (frames, rows, columns) or (frames, rows, columns, 3) for colour.

    Greyscale values are Modality LUT output instead when the file has a Modality LUT Sequence,
    and palette colour images are 8-bit RGB. Arrays are in native byte order.
    """
    dataset = dicom_file.header_dataset
    dicom_file.header_dataset = None  # decoded once; release the header
    if dataset is None:
        dataset, _ = read_dataset(dicom_file.path, headers_only=False)
    if "TransferSyntaxUID" not in dataset.file_meta:
        # The file meta is missing or lacks the element, and pydicom needs the encoding to decode pixels.
        dataset.file_meta.TransferSyntaxUID = dicom_file.transfer_syntax
    try:
        array = _read_native_greyscale(dicom_file, dataset)
        if array is None:
            array = dataset.pixel_array
        if dicom_file.photometric == "PALETTE COLOR":
            array = _palette_to_rgb(array, dataset)
    except Exception as exc:  # decoders raise ValueError, RuntimeError, and plugin-specific types
        raise Rejection(
            Reason.DECODE_FAILED,
            f"{dicom_file.path.name}: pixel data cannot be decoded ({exc.__class__.__name__}: {exc}); "
            "re-export the file from the archive or decompress it with dcmdjpeg or gdcmconv",
        ) from exc
    colour = array.ndim == (4 if dicom_file.number_of_frames > 1 else 3)
    if dicom_file.number_of_frames == 1:
        array = array[np.newaxis]
    if not colour and dicom_file.photometric != "PALETTE COLOR":
        array = _fix_unused_bits(array, dicom_file)
        if dicom_file.modality_lut_bits is not None:
            array = apply_modality_lut(array, dataset)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _inversion_range(dicom_file: DicomFile) -> tuple[int, int]:
    """Lowest and highest stored value that MONOCHROME1 inversion maps onto each other."""
    if dicom_file.modality_lut_bits is not None:
        return 0, (1 << dicom_file.modality_lut_bits) - 1
    if dicom_file.pixel_representation == 1:
        return -(1 << (dicom_file.bits_stored - 1)), (1 << (dicom_file.bits_stored - 1)) - 1
    return 0, (1 << dicom_file.bits_stored) - 1


def integer_rescale(stored: np.ndarray, dicom_file: DicomFile, frame: FrameInfo) -> tuple[int, int] | None:
    """Return (sign, offset) with physical values = sign * stored + offset, exact in integers, or None.

    None means the frame needs floating point: float stored values, a slope other than 1 or a
    non-integer intercept. ``sign`` is -1 for MONOCHROME1, which is inverted, and 1 otherwise.
    """
    slope = 1.0 if frame.rescale_slope is None else frame.rescale_slope
    intercept = 0.0 if frame.rescale_intercept is None else frame.rescale_intercept
    if not (np.issubdtype(stored.dtype, np.integer) and slope == 1.0 and float(intercept).is_integer()):
        return None
    if dicom_file.photometric == "MONOCHROME1":
        low, high = _inversion_range(dicom_file)
        return -1, low + high + int(intercept)
    return 1, int(intercept)


def physical_values(stored: np.ndarray, dicom_file: DicomFile, frame: FrameInfo) -> tuple[np.ndarray, bool]:
    """Convert one greyscale frame of stored values to physical values.

    Integer stored values with slope 1 and an integer intercept (most CT) stay integers (int32 or int64), which
    is exact and avoids float64 copies of the volume; everything else is computed in float64.
    Returns the array and whether it was inverted from MONOCHROME1.
    """
    slope = 1.0 if frame.rescale_slope is None else frame.rescale_slope
    intercept = 0.0 if frame.rescale_intercept is None else frame.rescale_intercept
    exact = np.issubdtype(stored.dtype, np.integer) and slope == 1.0 and float(intercept).is_integer()
    # 8- and 16-bit stored values plus an intercept fit int32, half the memory of int64 and float64.
    integer_type = np.int32 if stored.dtype.itemsize <= 2 else np.int64
    values = stored.astype(integer_type if exact else np.float64)
    inverted = dicom_file.photometric == "MONOCHROME1"
    if inverted:
        low, high = _inversion_range(dicom_file)
        values = (low + high) - values
    if exact:
        if intercept != 0.0:
            values += int(intercept)
    elif slope != 1.0 or intercept != 0.0:
        values = values * slope + intercept
    return values, inverted


def compact_dtype(values: np.ndarray) -> np.dtype:
    """Smallest lossless output type: int16/uint16/int32 for integer values, float32 otherwise."""
    if not np.issubdtype(values.dtype, np.integer) and (
            not np.all(np.isfinite(values)) or not np.all(values == np.round(values))):
        return np.dtype(np.float32)
    return compact_integer_dtype(float(values.min()), float(values.max()))


def compact_integer_dtype(low: float, high: float) -> np.dtype:
    """Smallest of int16/uint16/int32 that holds integers from ``low`` to ``high``, else float32."""
    for dtype in (np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if low >= info.min and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.float32)
