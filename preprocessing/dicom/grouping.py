"""Group DICOM files into candidate volumes and 2D images.

Files are grouped by SeriesInstanceUID (or, without one, by folder and frame of reference), then
split where orientation, matrix size, pixel spacing, samples per pixel or image type differ.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from preprocessing.dicom.headers import DicomFile
from preprocessing.reasons import Reason

VOLUMETRIC_MODALITIES = {"CT", "MR", "PT", "NM"}


@dataclass
class SeriesGroup:
    """Files that share a series and one acquisition geometry."""

    series_key: str
    files: list[DicomFile]
    # Set when the series had to be split; used in messages.
    split_note: str | None = None

    @property
    def first(self) -> DicomFile:
        return self.files[0]

    @property
    def n_frames(self) -> int:
        return sum(f.number_of_frames for f in self.files)

    @property
    def label(self) -> str:
        """Human-readable name: the source folder and file count, never a patient identifier."""
        folders = sorted({str(PurePosixPath(f.rel_path).parent) for f in self.files})
        where = folders[0] if len(folders) == 1 else f"{folders[0]} (+{len(folders) - 1} folders)"
        if len(self.files) == 1:
            return f"{self.files[0].rel_path}"
        return f"series in {where} ({len(self.files)} files)"

    def exclusion(self, include_localizers: bool, include_derived: bool) -> Reason | None:
        """Return why this group is left out of training by default, or None."""
        if self.first.is_localizer and not include_localizers:
            return Reason.LOCALIZER
        if (self.first.is_derived or self.first.is_secondary) and not include_derived:
            return Reason.DERIVED
        return None


def _series_key(dicom_file: DicomFile) -> str:
    if dicom_file.series_uid:
        return f"uid:{dicom_file.series_uid}"
    folder = str(PurePosixPath(dicom_file.rel_path).parent)
    return f"nouid:{folder}:{dicom_file.frame_of_reference_uid or ''}:{dicom_file.study_uid or ''}"


def _geometry_key(dicom_file: DicomFile) -> tuple:
    frame = dicom_file.frames[0]
    orientation = None if frame.orientation is None else tuple(np.round(frame.orientation, 4))
    spacing = None if frame.pixel_spacing_rc_mm is None else tuple(np.round(frame.pixel_spacing_rc_mm, 4))
    return (
        dicom_file.rows,
        dicom_file.columns,
        spacing,
        dicom_file.samples_per_pixel,
        dicom_file.is_localizer,
        dicom_file.is_derived or dicom_file.is_secondary,
        orientation,
    )


def deduplicate(files: list[DicomFile]) -> tuple[list[DicomFile], list[DicomFile]]:
    """Drop second copies of the same SOP instance; return (kept, duplicates)."""
    seen: dict[tuple, DicomFile] = {}
    kept, duplicates = [], []
    for dicom_file in sorted(files, key=lambda f: f.rel_path):
        key = (dicom_file.series_uid, dicom_file.sop_instance_uid)
        if dicom_file.sop_instance_uid and key in seen:
            duplicates.append(dicom_file)
            continue
        seen[key] = dicom_file
        kept.append(dicom_file)
    return kept, duplicates


def group_files(files: list[DicomFile]) -> list[SeriesGroup]:
    """Split files into groups that could each form one volume (or one 2D image per file)."""
    by_series: dict[str, list[DicomFile]] = defaultdict(list)
    for dicom_file in files:
        by_series[_series_key(dicom_file)].append(dicom_file)

    groups: list[SeriesGroup] = []
    for series_key in sorted(by_series):
        members = by_series[series_key]
        by_geometry: dict[tuple, list[DicomFile]] = defaultdict(list)
        for dicom_file in members:
            # A multi-frame file is a volume (or cine) by itself.
            key = ("file", dicom_file.rel_path) if dicom_file.number_of_frames > 1 else _geometry_key(dicom_file)
            by_geometry[key].append(dicom_file)
        split_note = None
        if len(by_geometry) > 1:
            split_note = f"series split into {len(by_geometry)} groups by geometry or image type"
        for key in sorted(by_geometry, key=repr):
            groups.append(SeriesGroup(series_key, sorted(by_geometry[key], key=lambda f: f.rel_path), split_note))
    return groups


def orientation_conflicts(groups: list[SeriesGroup]) -> set[int]:
    """Indices of groups whose series changes orientation between its (non-localizer) images.

    A series holding stacks of different ImageOrientationPatient is either one acquisition whose
    orientation changed or several acquisitions under one UID; preparing either part alone could
    hide a broken export, so these groups are rejected unless the site asks for the split.
    """
    by_series: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        if group.first.number_of_frames > 1 or group.first.is_localizer:
            continue
        by_series[group.series_key].append(index)
    conflicted: set[int] = set()
    for indices in by_series.values():
        orientations = {_geometry_key(groups[i].first)[-1] for i in indices}
        if len(orientations) > 1:
            conflicted.update(indices)
    return conflicted


def is_volumetric(group: SeriesGroup) -> bool:
    """Whether the group should become a 3D volume rather than one or more 2D images."""
    first = group.first
    if first.samples_per_pixel != 1 and first.modality not in VOLUMETRIC_MODALITIES:
        return False
    has_geometry = all(
        frame.position_lps is not None and frame.orientation is not None for f in group.files for frame in f.frames
    )
    if group.n_frames > 1:
        return has_geometry
    return has_geometry and first.modality in VOLUMETRIC_MODALITIES and first.frames[0].pixel_spacing_rc_mm is not None
