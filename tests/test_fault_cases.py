"""The fault cases beside the repository give the values in their expected.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import CASES, require
from tests.geometry_helpers import load

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def expected(case: str) -> dict:
    return json.loads((require(CASES / case) / "expected.json").read_text())


def only_case(manifest):
    assert len(manifest["cases"]) == 1, manifest["rejected"]
    return manifest["cases"][0]


@pytest.mark.parametrize("subcase", ["a_reversed_instance", "b_constant_instance"])
def test_slice_order_by_position(subcase, prepare):
    truth = expected("01-slice-order")["subcases"][subcase]
    manifest, out = prepare(CASES / "01-slice-order" / subcase)
    case = only_case(manifest)
    array, affine = load(out / case["image"])

    assert list(array.shape[::-1]) == truth["shape_kji"]
    assert case["spacing_mm"] == pytest.approx(truth["spacing_xyz_mm"])
    np.testing.assert_allclose(affine, truth["affine_ras"], atol=1e-4)
    i, j, _ = truth["marker_voxel_ijk_per_slice"]
    assert [int(v) for v in array[i, j, :]] == truth["marker_hu_by_sorted_slice"]
    for k, marker in enumerate(truth["marker_world_mm"]):
        world_lps = (RAS_FROM_LPS @ affine @ [i, j, k, 1])[:3]
        np.testing.assert_allclose(world_lps, marker["world_lps"], atol=1e-3)


@pytest.mark.parametrize("subcase", ["a_thickness_only", "b_bogus_sbs"])
def test_slice_spacing_from_positions(subcase, prepare):
    truth = expected("02-slice-spacing")["subcases"][subcase]
    manifest, out = prepare(CASES / "02-slice-spacing" / subcase)
    case = only_case(manifest)
    _, affine = load(out / case["image"])

    assert case["spacing_mm"] == pytest.approx(truth["spacing_xyz_mm"])
    assert case["spacing_source"]["slice"] == "ImagePositionPatient"
    np.testing.assert_allclose(RAS_FROM_LPS @ affine, truth["affine_lps"], atol=1e-4)
    assert np.linalg.det(affine[:3, :3] @ np.diag([-1, -1, 1])) > 0
    assert any("differs from" in note for note in case["notes"]), "tag disagreement should be noted"


def test_mixed_series_and_localizer(prepare):
    truth = expected("04-mixed-series-localizer")
    manifest, out = prepare(CASES / "04-mixed-series-localizer")

    by_files = {case["num_source_files"]: case for case in manifest["cases"]}
    assert len(manifest["cases"]) == len(truth["volumes"])
    for volume in truth["volumes"]:
        case = by_files[len(volume["files"])]
        assert case["shape"] == volume["shape_kji"][::-1]
        assert case["spacing_mm"] == pytest.approx(volume["spacing_xyz_mm"])
    excluded = manifest["excluded"]
    assert [(e["path"], e["reason"]) for e in excluded] == [(f, "localizer") for f in truth["volumes"][0]["excluded_files"]]
    assert "--include-localizers" in excluded[0]["message"]
    assert [s["path"] for s in manifest["skipped"]] == ["expected.json"]


def test_per_slice_rescale(prepare):
    truth = expected("06-intensity")["subcases"]["a_per_slice_rescale"]
    manifest, out = prepare(CASES / "06-intensity" / "a_per_slice_rescale")
    array, _ = load(out / only_case(manifest)["image"])
    # Any output type is fine as long as it is lossless: here all values happen to be integers.
    for k, value in enumerate(truth["expected_value_by_slice"]):
        assert np.all(array[:, :, k] == value)


def test_mr_without_rescale(prepare):
    truth = expected("06-intensity")["subcases"]["b_mr_no_rescale"]
    manifest, out = prepare(CASES / "06-intensity" / "b_mr_no_rescale")
    array, _ = load(out / only_case(manifest)["image"])
    assert np.all(array == truth["expected_value"])


def test_signed_12bit_junk_high_bits(prepare):
    truth = expected("06-intensity")["subcases"]["c_signed_12bit"]["expected_hu"]
    manifest, out = prepare(CASES / "06-intensity" / "c_signed_12bit")
    array, _ = load(out / only_case(manifest)["image"])
    image = array[:, :, 0].T  # (row, column)
    assert image[2, 3] == truth["row2_col3"]
    assert image[2, 4] == truth["row2_col4"]
    others = np.ones(image.shape, dtype=bool)
    others[2, 3:5] = False
    assert np.all(image[others] == truth["all_pixels_except_row2_col3_4"])


def test_monochrome1_inverted_once(prepare):
    truth = expected("06-intensity")["subcases"]["d_monochrome1"]
    manifest, out = prepare(CASES / "06-intensity" / "d_monochrome1")
    case = only_case(manifest)
    array, _ = load(out / case["image"])
    image = array.T  # (row, column)
    converted = truth["expected_after_conversion_to_monochrome2"]
    assert image[0, 0] == converted["background"]
    assert np.all(image[4:12, 6:10] == converted["bone"])
    assert case["intensity"]["monochrome1_inverted"] is True


def test_jpeg_lossless_decodes(prepare):
    truth = expected("08-unreadable-pixels")["subcases"]["a_jpeg_lossless"]["with_decoder"]
    folder = CASES / "08-unreadable-pixels" / "a_jpeg_lossless"
    manifest, out = prepare(folder)
    array, _ = load(out / only_case(manifest)["image"])
    image = array[:, :, 0].T
    assert image[0, 0] == truth["hu_at_row0_col0"]
    assert image[15, 15] == truth["hu_at_row15_col15"]
    stored = np.load(folder / truth["stored_values"])
    np.testing.assert_array_equal(image - image[0, 0], stored.astype(np.int64) - int(stored[0, 0]))


def test_truncated_file_rejected_not_zero_filled(prepare):
    truth = expected("08-unreadable-pixels")["subcases"]["b_truncated_series"]
    manifest, _ = prepare(CASES / "08-unreadable-pixels" / "b_truncated_series")
    by_reason = {entry["reason"]: entry for entry in manifest["rejected"]}

    truncated = by_reason["truncated_pixel_data"]
    assert truncated["path"] == truth["truncated_file"]
    assert f"{truth['pixel_bytes_present']} of {truth['pixel_bytes_expected']} bytes" in truncated["message"]
    assert "re-export" in truncated["message"]
    # The remaining three slices have a gap where the file was: rejected, never stacked.
    assert "slice_gap" in by_reason
    assert manifest["cases"] == []
