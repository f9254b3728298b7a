"""Prepared volumes against dicom2nifti's reference NIfTI files, compared in world coordinates.

Tolerances: voxel centres must coincide within 0.01 mm. Integer data must be equal. Rescaled
data is written as float32, so it must match the float64 reference within float32 rounding
(relative 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import DATA, require
from tests.geometry_helpers import load, map_reference_voxels

CORPUS = DATA / "dicom_corpus" / "dicom2nifti"
WORLD_TOLERANCE_MM = 0.01

# Series with a ground truth that are 3D volumes, with the options they need.
MATCHED = {
    "anatomical/001": {},
    "anatomical/001_implicit": {},
    "ge/anatomical/001": {},
    "ge/anatomical/001_single_slice": {},
    "generic/anatomical/001": {},
    "generic/anatomical/001_implicit": {},
    "generic/anatomical/002_non_isotropic": {},
    "generic/compressed/001": {},
    "generic/compressed_j2k/001": {},
    "generic/compressed_jpeg/001": {},
    "generic/compressed_jpegls/001": {},
    "generic/compressed_rle/001": {},
    # Secondary-capture RGB images are left out by default (ImageType DERIVED\SECONDARY).
    "generic/rgb/001": {"include_derived": True},
    "philips/anatomical/001": {},
    "siemens/anatomical/001": {},
    # Two slices are a valid (thin) volume; dicom2nifti's own tests reject it, but its reference exists.
    "failing/slicecount/001": {},
}

# 4D series (their references are 4D) and broken series: rejected with a specific reason.
REJECTED = {
    "ge/dti/001": "four_d",
    "ge/dti/002": "four_d",
    "ge/fmri/001": "four_d",
    "philips/dti/001": "four_d",
    "philips/fmri/001": "four_d",
    "siemens/dti_classic/001": "four_d",
    "siemens/fmri/001": "siemens_mosaic",
    "siemens/fmri_classic/001": "four_d",
    "failing/notavolume/001": "duplicate_position",
    # ImageType ORIGINAL\\SECONDARY: excluded by default, so the gap shows only with the option.
    "failing/sliceincrement/001": "slice_gap",
    "failing/sliceincrement/002": "slice_gap",
    "failing/sliceorientation/001": "inconsistent_slices",
}


def test_every_reference_is_listed():
    require(CORPUS)
    references = {
        str(p.relative_to(CORPUS)).replace("_ground_truth.nii.gz", "") for p in CORPUS.rglob("*_ground_truth.nii.gz")
    }
    assert references <= set(MATCHED) | set(REJECTED)
    failing = {str(p.relative_to(CORPUS)) for p in (CORPUS / "failing").glob("*/*") if p.is_dir()}
    assert failing <= set(MATCHED) | set(REJECTED)


@pytest.mark.parametrize("series", sorted(MATCHED))
def test_volume_matches_reference(series, prepare):
    manifest, out = prepare(require(CORPUS / series), **MATCHED[series])
    assert manifest["rejected"] == []
    assert len(manifest["cases"]) == 1
    ours, ours_affine = load(out / manifest["cases"][0]["image"])
    reference, ref_affine = load(CORPUS / f"{series}_ground_truth.nii.gz")

    ref_index, ours_index = map_reference_voxels(
        ours_affine, ours.shape, ref_affine, reference.shape, WORLD_TOLERANCE_MM
    )
    assert np.prod(ours.shape[:3]) == ref_index.shape[1], "reference and prepared volume differ in voxel count"
    if reference.dtype.names:  # RGB(A) reference
        for channel, name in enumerate("RGB"):
            expected = reference[name][tuple(ref_index)]
            actual = ours[(*ours_index, np.full(ours_index.shape[1], channel))]
            np.testing.assert_array_equal(actual, expected)
        return
    expected = reference[tuple(ref_index)].astype(np.float64)
    actual = ours[tuple(ours_index)].astype(np.float64)
    if np.issubdtype(ours.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("series", sorted(REJECTED))
def test_series_rejected_with_reason(series, prepare):
    options = {"include_derived": True} if series == "failing/sliceincrement/001" else {}
    manifest, _ = prepare(require(CORPUS / series), **options)
    assert manifest["cases"] == []
    reasons = {entry["reason"] for entry in manifest["rejected"]}
    assert reasons == {REJECTED[series]}
    for entry in manifest["rejected"]:
        assert entry["message"]
