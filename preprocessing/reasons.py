"""Fixed vocabulary of reasons why a file or series is not turned into a training case.

Every entry in a manifest's ``rejected`` and ``excluded`` lists carries one of these codes, so
a site can count and filter them; the free-text message next to it says what to do.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    """Reason code stored in ``manifest.json``."""

    NOT_DICOM = "not_dicom"
    DICOMDIR = "dicomdir"
    UNREADABLE_FILE = "unreadable_file"
    NO_PIXEL_DATA = "no_pixel_data"
    RTSTRUCT_NOT_SUPPORTED = "rtstruct_not_supported"
    WHOLE_SLIDE_IMAGE = "whole_slide_image"
    TRUNCATED_PIXEL_DATA = "truncated_pixel_data"
    NO_DECODER = "no_decoder"
    DECODE_FAILED = "decode_failed"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    LOCALIZER = "localizer"
    DERIVED = "derived"
    MULTIFRAME_CINE = "multiframe_cine"
    FOUR_D = "four_d"
    SIEMENS_MOSAIC = "siemens_mosaic"
    MISSING_GEOMETRY = "missing_geometry"
    DUPLICATE_POSITION = "duplicate_position"
    DUPLICATE_INSTANCE = "duplicate_instance"
    SLICE_GAP = "slice_gap"
    NON_UNIFORM_SPACING = "non_uniform_spacing"
    GANTRY_TILT = "gantry_tilt"
    INCONSISTENT_SLICES = "inconsistent_slices"
    UNREADABLE_VOLUME = "unreadable_volume"
    SEG_UNRESOLVED = "seg_unresolved"
    LABEL_UNREADABLE = "label_unreadable"
    LABEL_UNMATCHED = "label_unmatched"
    LABEL_OUTSIDE_IMAGE = "label_outside_image"
    # Whole-slide images and tiles.
    NOT_A_SLIDE = "not_a_slide"
    UNREADABLE_SLIDE = "unreadable_slide"
    NO_MPP = "no_mpp"
    RESOLUTION_TOO_COARSE = "resolution_too_coarse"
    NO_TISSUE = "no_tissue"
    LABEL_MISSING = "label_missing"
    ANNOTATION_INVALID = "annotation_invalid"
    UNREADABLE_TILE = "unreadable_tile"


class Rejection(Exception):
    """A file or series cannot become a case; carries the reason code and an actionable message."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
