"""Label files matched to images by the naming rule, by CSV, and resampled in physical space."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from tests.conftest import CASES
from tests.test_prepare_cli import write_series

TRUTH = json.loads((CASES / "01-slice-order" / "expected.json").read_text())["subcases"]["a_reversed_instance"]
AFFINE_RAS = np.array(TRUTH["affine_ras"])
SHAPE_XYZ = tuple(TRUTH["shape_kji"][::-1])


def write_label(path, values_by_slice, flip_y=False):
    """Write a label map on the series grid; with ``flip_y`` the same labels on a y-flipped grid."""
    data = np.zeros(SHAPE_XYZ, dtype=np.uint8)
    for k, value in enumerate(values_by_slice):
        data[2:6, 3:9, k] = value
    affine = AFFINE_RAS.copy()
    if flip_y:
        data = data[:, ::-1, :]
        affine[:, 3] = AFFINE_RAS @ [0, SHAPE_XYZ[1] - 1, 0, 1]
        affine[:, 1] = -AFFINE_RAS[:, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def prepared_label(out, case):
    return np.asarray(nib.load(str(out / case["label"])).dataobj)


def test_naming_rule_and_mask_folders(tmp_path, prepare):
    source, labels = tmp_path / "source", tmp_path / "labels"
    write_series(source / "caseA", "P1")
    write_series(source / "caseB", "P2")
    write_label(labels / "caseA_seg.nii.gz", [1, 1, 2, 2, 3, 3], flip_y=True)
    write_label(labels / "caseB" / "liver.nii.gz", [1] * 6)
    write_label(labels / "caseB" / "spleen.nii.gz", [1, 0, 0, 0, 0, 1])
    write_label(labels / "caseZ_seg.nii.gz", [1] * 6)

    manifest, out = prepare(source, labels=labels)
    by_source = {case["source"]: case for case in manifest["cases"]}
    case_a, case_b = by_source["caseA"], by_source["caseB"]
    assert case_a["label_values"] == [0, 1, 2, 3]
    label = prepared_label(out, case_a)
    # The flipped file lands on the same voxels as an unflipped one would.
    assert label[2:6, 3:9, 2].tolist() == np.full((4, 6), 2).tolist()
    assert label.sum() == 4 * 6 * (1 + 1 + 2 + 2 + 3 + 3)
    assert sorted(case_b["masks"]) == ["liver", "spleen"]
    spleen = np.asarray(nib.load(str(out / case_b["masks"]["spleen"])).dataobj)
    assert spleen[:, :, 0].sum() == 24 and spleen[:, :, 1].sum() == 0
    unmatched = [entry for entry in manifest["rejected"] if entry["reason"] == "label_unmatched"]
    assert [entry["path"] for entry in unmatched] == ["caseZ_seg.nii.gz"]


def test_csv_source_pairs_images_and_labels(tmp_path, prepare):
    write_series(tmp_path / "img" / "one", "P1")
    write_series(tmp_path / "img" / "two", "P2")
    write_label(tmp_path / "lab" / "first.nii.gz", [4] * 6)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,label\nimg/one,lab/first.nii.gz\nimg/two,\n")

    manifest, out = prepare(csv_path)
    by_source = {case["source"]: case for case in manifest["cases"]}
    assert by_source["img/one"]["label_values"] == [0, 4]
    assert by_source["img/two"]["label"] is None
    datalist = json.loads((out / "datalist.json").read_text())
    items = datalist["training"] + datalist["validation"]
    assert sum("label" in item for item in items) == 1


def test_label_outside_image_rejected(tmp_path, prepare):
    write_series(tmp_path / "src" / "caseA", "P1")
    far = tmp_path / "labels" / "caseA_seg.nii.gz"
    far.parent.mkdir()
    affine = AFFINE_RAS.copy()
    affine[:3, 3] += 500.0
    nib.save(nib.Nifti1Image(np.ones(SHAPE_XYZ, dtype=np.uint8), affine), str(far))
    manifest, _ = prepare(tmp_path / "src", labels=tmp_path / "labels")
    assert [entry["reason"] for entry in manifest["rejected"]] == ["label_outside_image"]
    assert manifest["cases"][0]["label"] is None
