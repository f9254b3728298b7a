"""Read research volumes (NIfTI, NRRD, MHA/MHD) through MONAI's image readers.

MONAI returns arrays indexed (x, y, z) with a voxel-to-RAS affine; this module converts the
affine to LPS so research volumes and DICOM volumes share one convention inside the project.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocessing.reasons import Reason, Rejection

RESEARCH_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_research_volume(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in RESEARCH_SUFFIXES)


def research_stem(path: Path) -> str:
    """File name without its volume suffix (``ct.nii.gz`` -> ``ct``)."""
    name = path.name
    for suffix in sorted(RESEARCH_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _reader_for(path: Path):
    from monai.data import ITKReader, NibabelReader, NrrdReader

    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return NibabelReader()
    if name.endswith((".nrrd", ".nhdr")):
        return NrrdReader()
    return ITKReader()


def load_research_volume(path: Path, reason: Reason = Reason.UNREADABLE_VOLUME) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(array_xyz, affine_lps)`` for a NIfTI, NRRD or MHA/MHD file.

    Raises ``Rejection`` with ``reason`` when no reader opens the file.
    """
    # The reader is used directly: LoadImage would also instantiate every other reader, including
    # a GPU DICOM reader that warns when nvImageCodec is missing.
    reader = _reader_for(path)
    try:
        image, meta = reader.get_data(reader.read(str(path)))
    except Exception as exc:  # readers raise many types on corrupt files
        raise Rejection(
            reason, f"{path.name}: cannot be read as a NIfTI/NRRD/MHA volume ({exc.__class__.__name__}: {exc})"
        ) from exc
    array = np.asarray(image)
    if array.dtype.names is not None or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise Rejection(
            Reason.UNSUPPORTED_PIXEL_FORMAT,
            f"{path.name}: voxel type {array.dtype} (for example RGB or RGBA NIfTI) is not a scalar volume; "
            "convert it to a greyscale volume or prepare the source DICOM series instead",
        )
    affine_ras = np.asarray(meta["affine"], dtype=np.float64)
    if array.ndim > 3 and all(size == 1 for size in array.shape[3:]):
        array = array.reshape(array.shape[:3])
    if array.ndim != 3:
        raise Rejection(
            Reason.FOUR_D,
            f"{path.name}: volume has shape {tuple(array.shape)}; only 3D volumes are prepared (4D is not supported)",
        )
    return array, _RAS_FROM_LPS @ affine_ras
