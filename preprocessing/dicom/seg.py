"""Place DICOM SEG segments onto the grid of the image series they reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocessing.dicom.headers import DicomFile, read_dataset
from preprocessing.reasons import Reason, Rejection

_GRID_TOLERANCE_VOXELS = 0.05


@dataclass
class SegLabels:
    """Segments of one SEG object on an image grid, indexed (x, y, z)."""

    segment_names: dict[int, str]
    label_map: np.ndarray | None  # segment numbers, when no two segments overlap
    masks: dict[str, np.ndarray] | None  # one binary mask per segment name, when they overlap


def _segment_names(dataset) -> dict[int, str]:
    names = {}
    for item in dataset.get("SegmentSequence") or []:
        number = int(item.SegmentNumber)
        names[number] = str(item.get("SegmentLabel") or f"segment_{number}")
    return names


def _frame_segment(per_frame, index: int, path_name: str) -> int:
    item = per_frame.get("SegmentIdentificationSequence") if per_frame is not None else None
    if not item:
        raise Rejection(Reason.SEG_UNRESOLVED, f"{path_name}: frame {index + 1} names no segment")
    return int(item[0].ReferencedSegmentNumber)


def seg_onto_grid(seg_file: DicomFile, image_shape: tuple[int, ...], image_affine_lps: np.ndarray) -> SegLabels:
    """Decode ``seg_file`` and place each frame on the image grid by its plane position.

    Raises ``Rejection`` (``seg_unresolved``) when a frame does not fall on an image slice.
    """
    dataset, _ = read_dataset(seg_file.path, headers_only=False)
    name = seg_file.path.name
    try:
        frames = dataset.pixel_array
    except Exception as exc:  # decoder errors vary by plugin
        raise Rejection(Reason.DECODE_FAILED, f"{name}: SEG pixel data cannot be decoded ({exc})") from exc
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    if str(dataset.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        maximum = float(dataset.get("MaximumFractionalValue") or 255)
        frames = frames.astype(np.float64) / maximum >= 0.5
    else:
        frames = frames > 0

    names = _segment_names(dataset)
    shape = tuple(image_shape[:3])
    to_image = np.linalg.inv(image_affine_lps)
    per_segment = {number: np.zeros(shape, dtype=bool) for number in names}
    per_frame_seq = dataset.get("PerFrameFunctionalGroupsSequence") or []
    shared = (dataset.get("SharedFunctionalGroupsSequence") or [None])[0]
    for index, frame_info in enumerate(seg_file.frames):
        per_frame = per_frame_seq[index] if index < len(per_frame_seq) else None
        number = _frame_segment(per_frame, index, name) if per_frame is not None else _frame_segment(shared, index, name)
        if frame_info.position_lps is None or frame_info.orientation is None:
            raise Rejection(Reason.SEG_UNRESOLVED, f"{name}: frame {index + 1} has no plane position or orientation")
        spacing = frame_info.pixel_spacing_rc_mm
        if spacing is None:
            raise Rejection(Reason.SEG_UNRESOLVED, f"{name}: frame {index + 1} has no pixel spacing")
        # Corners of the frame in image voxel coordinates: the frame must sit on the image grid.
        origin = (to_image @ np.append(frame_info.position_lps, 1.0))[:3]
        step_col = to_image[:3, :3] @ (frame_info.orientation[:3] * spacing[1])
        step_row = to_image[:3, :3] @ (frame_info.orientation[3:] * spacing[0])
        if not (np.allclose(step_col, [1, 0, 0], atol=_GRID_TOLERANCE_VOXELS)
                and np.allclose(step_row, [0, 1, 0], atol=_GRID_TOLERANCE_VOXELS)
                and np.allclose(origin, np.round(origin), atol=_GRID_TOLERANCE_VOXELS)):
            raise Rejection(
                Reason.SEG_UNRESOLVED,
                f"{name}: frame {index + 1} does not lie on the referenced image grid "
                "(different orientation, spacing or in-between slice position); "
                "export the segmentation on the image grid or as a NIfTI label map",
            )
        x0, y0, k = (int(v) for v in np.round(origin))
        if not 0 <= k < shape[2]:
            raise Rejection(
                Reason.LABEL_OUTSIDE_IMAGE, f"{name}: frame {index + 1} lies outside the image (slice {k})"
            )
        frame = frames[index].T  # (column, row)
        x1, y1 = min(shape[0], x0 + frame.shape[0]), min(shape[1], y0 + frame.shape[1])
        per_segment.setdefault(number, np.zeros(shape, dtype=bool))
        per_segment[number][max(x0, 0):x1, max(y0, 0):y1, k] |= frame[max(0, -x0):x1 - x0, max(0, -y0):y1 - y0]

    stacked = sum(mask.astype(np.uint16) for mask in per_segment.values())
    if np.any(stacked > 1):
        return SegLabels(names, None, {names.get(n, f"segment_{n}"): m.astype(np.uint8) for n, m in per_segment.items()})
    label_dtype = np.uint8 if max(per_segment, default=0) < 256 else np.uint16
    label_map = np.zeros(shape, dtype=label_dtype)
    for number, mask in per_segment.items():
        label_map[mask] = number
    return SegLabels(names, label_map, None)
