"""The faster code paths of ``prepare dicom`` give the same results as the general ones.

Covered: uncompressed pixel data read straight from the file, integer volumes written into one
preallocated array, and decoding in worker processes (``--workers``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from preprocessing.dicom import pixels, volume
from preprocessing.dicom.headers import read_header
from preprocessing.reasons import Rejection
from tests.conftest import CASES, DATA, require

TOTALSEG = DATA / "radiology" / "totalseg" / "example_ct_dicom"
CT_SERIES = CASES / "01-slice-order" / "a_reversed_instance"


def _corpus_headers():
    for path in sorted(require(DATA / "dicom_corpus").rglob("*")):
        if not path.is_file():
            continue
        try:
            yield read_header(path, path.name)
        except Rejection:
            continue


def test_native_read_matches_pydicom():
    compared = 0
    for dicom_file in _corpus_headers():
        dataset = dicom_file.header_dataset
        if dataset is None:
            continue
        native = pixels._read_native_greyscale(dicom_file, dataset)
        if native is None:
            continue
        expected = pydicom.dcmread(dicom_file.path).pixel_array
        assert native.shape == expected.shape, dicom_file.rel_path
        assert native.dtype.kind == expected.dtype.kind, dicom_file.rel_path
        assert native.dtype.itemsize == expected.dtype.itemsize, dicom_file.rel_path
        fixed_native = pixels._fix_unused_bits(native, dicom_file)
        fixed_expected = pixels._fix_unused_bits(expected, dicom_file)
        assert np.array_equal(fixed_native, fixed_expected), dicom_file.rel_path
        compared += 1
    assert compared >= 10


def test_fix_unused_bits_matches_int64_reference():
    dicom_file = read_header(sorted(require(CT_SERIES).iterdir())[0], "slice.dcm")
    rng = np.random.default_rng(0)
    for dtype, representation in ((np.uint16, 0), (np.int16, 1), (np.uint16, 1), (np.int16, 0), (np.int32, 1)):
        array = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(64, 64), dtype=dtype, endpoint=True)
        for bits in (8, 12, 15):
            described = replace(dicom_file, bits_stored=bits, pixel_representation=representation)
            reference = array.astype(np.int64) & ((1 << bits) - 1)
            if representation == 1:
                sign_bit = 1 << (bits - 1)
                reference = (reference ^ sign_bit) - sign_bit
            result = pixels._fix_unused_bits(array, described)
            assert result.dtype == array.dtype
            assert np.array_equal(result, reference.astype(dtype)), (dtype, representation, bits)


def _general_stack(stored_slices, dicom_file, frames):
    values = [pixels.physical_values(stored, dicom_file, frame)[0] for stored, frame in zip(stored_slices, frames)]
    stack = np.stack(values)
    return stack.astype(pixels.compact_dtype(stack))


@pytest.mark.parametrize(
    ("dtype", "low", "high", "intercept", "photometric", "expected_dtype"),
    [
        (np.int16, 0, 3000, -1024, "MONOCHROME2", np.int16),
        (np.uint16, 0, 4095, -1024, "MONOCHROME2", np.int16),
        (np.uint16, 30000, 65535, 0, "MONOCHROME2", np.uint16),
        (np.int16, -2000, 32767, 40000, "MONOCHROME2", np.int32),
        (np.uint16, 0, 4095, 0, "MONOCHROME1", np.uint16),
        (np.uint8, 0, 255, 5, "MONOCHROME1", np.int16),
    ],
)
def test_integer_stack_matches_general_path(dtype, low, high, intercept, photometric, expected_dtype):
    header = read_header(sorted(require(CT_SERIES).iterdir())[0], "slice.dcm")
    bits = np.iinfo(dtype).bits if low < 0 or dtype == np.uint8 else 16
    dicom_file = replace(header, photometric=photometric, bits_stored=bits,
                         pixel_representation=1 if np.iinfo(dtype).min < 0 else 0)
    rng = np.random.default_rng(1)
    stored_slices = [rng.integers(low, high, size=(32, 24), dtype=dtype, endpoint=True) for _ in range(5)]
    frames = [replace(header.frames[0], rescale_slope=1.0, rescale_intercept=float(intercept - index))
              for index in range(5)]
    rescales = [pixels.integer_rescale(stored, dicom_file, frame) for stored, frame in zip(stored_slices, frames)]
    assert all(rescale is not None for rescale in rescales)

    fast = volume._integer_stack(stored_slices, rescales)
    general = _general_stack(stored_slices, dicom_file, frames)
    assert fast is not None
    assert fast.dtype == general.dtype == np.dtype(expected_dtype)
    assert np.array_equal(fast, general)


def test_integer_stack_leaves_float_range_to_general_path():
    stored_slices = [np.array([[0, 2**31 - 1]], dtype=np.int32)]
    assert volume._integer_stack(stored_slices, [(1, 10)]) is None


def test_integer_rescale_rejects_non_integer_rescale():
    header = read_header(sorted(require(CT_SERIES).iterdir())[0], "slice.dcm")
    stored = np.zeros((4, 4), dtype=np.int16)
    assert pixels.integer_rescale(stored, header, replace(header.frames[0], rescale_slope=0.5)) is None
    assert pixels.integer_rescale(stored, header, replace(header.frames[0], rescale_intercept=-1024.5)) is None
    assert pixels.integer_rescale(stored.astype(np.float32), header, header.frames[0]) is None


def _prepared_volumes(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    result = {}
    for case in manifest["cases"]:
        image = nib.load(out / case["image"])
        result[case["case_id"]] = (np.asarray(image.dataobj), image.affine, str(image.get_data_dtype()))
    return result


def _manifest_without_options(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("options")
    return manifest


def test_workers_give_identical_outputs(prepare, monkeypatch):
    require(TOTALSEG)
    from preprocessing import prepare_dicom as step

    pools = []
    start_pool = step._decode_pool
    monkeypatch.setattr(step, "_decode_pool", lambda workers: pools.append(workers) or start_pool(workers))

    _, out_one = prepare(TOTALSEG, workers=1)
    assert pools == []
    _, out_two = prepare(TOTALSEG, workers=2)
    assert pools == [2]

    one, two = _prepared_volumes(out_one), _prepared_volumes(out_two)
    assert one.keys() == two.keys()
    assert len(one) == 1
    for case_id, (array, affine, dtype) in one.items():
        assert dtype == two[case_id][2]
        assert np.array_equal(affine, two[case_id][1])
        assert np.array_equal(array, two[case_id][0])
    assert _manifest_without_options(out_one) == _manifest_without_options(out_two)


def test_workers_report_decode_failure_alike(prepare, tmp_path):
    source = tmp_path / "series"
    shutil.copytree(require(TOTALSEG), source)
    broken = sorted(source.iterdir())[3]
    dataset = pydicom.dcmread(broken)
    fragments = list(pydicom.encaps.generate_frames(dataset.PixelData, number_of_frames=1))
    dataset.PixelData = pydicom.encaps.encapsulate([fragments[0][: len(fragments[0]) // 8]])
    dataset.save_as(broken)

    manifest_one, _ = prepare(source, workers=1)
    manifest_two, _ = prepare(source, workers=2)
    assert manifest_one["summary"]["volumes"] == 0
    assert manifest_one["rejected"] == manifest_two["rejected"]
    assert [entry["reason"] for entry in manifest_one["rejected"]] == ["decode_failed"]


def test_workers_below_one_rejected(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedimaging", "prepare", "dicom", str(require(CT_SERIES)), "--out", str(tmp_path / "o"),
         "--key-file", str(tmp_path / "k"), "--workers", "0"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2
    assert "--workers 0" in result.stderr
