"""Real series with labels: TotalSegmentator CT (JPEG 2000, UIDs stripped) and dcmqi CT with DICOM SEG."""

from __future__ import annotations

import numpy as np

from preprocessing.research import load_research_volume
from preprocessing.resample import resample_label_nearest
from tests.conftest import DATA, require
from tests.geometry_helpers import load

TOTALSEG = DATA / "radiology" / "totalseg"
DCMQI = DATA / "radiology" / "dcmqi" / "segmentations"
LIVER = 5  # TotalSegmentator's 117-class scheme


def test_totalseg_series_with_nifti_label(prepare):
    manifest, out = prepare(
        require(TOTALSEG / "example_ct_dicom"), labels=TOTALSEG / "example_seg_dicom.nii.gz"
    )
    assert manifest["rejected"] == []
    (case,) = manifest["cases"]
    assert case["shape"] == [512, 512, 20]
    assert case["num_source_files"] == 20
    assert case["spacing_source"]["slice"] == "ImagePositionPatient"
    assert case["spacing_mm"][2] == 2.0  # SliceThickness says 3 mm; the positions say 2 mm
    assert LIVER in case["label_values"]

    image, image_affine = load(out / case["image"])
    label, label_affine = load(out / case["label"])
    np.testing.assert_allclose(label_affine, image_affine)
    liver_hu = image[label == LIVER]
    assert liver_hu.size > 1000
    # Liver parenchyma on CT lies between about 0 and 150 HU; air (-1000) or fat (-100) means misalignment.
    assert 0 < np.median(liver_hu) < 150

    # The label file's y axis is flipped relative to the DICOM grid: stacking by array index is wrong.
    raw_label = np.asarray(load(TOTALSEG / "example_seg_dicom.nii.gz")[0])
    if raw_label.shape == image.shape:
        assert not np.array_equal(raw_label, label)


def test_dcmqi_ct_with_dicom_seg(prepare):
    manifest, out = prepare(require(DCMQI / "ct-3slice"), labels=DCMQI / "liver.dcm")
    assert manifest["rejected"] == []
    (case,) = manifest["cases"]
    assert case["label_source"].startswith("DICOM SEG")
    assert case["segment_names"] == {"1": "Liver"} or list(case["segment_names"]) == ["1"]

    image, image_affine = load(out / case["image"])
    label, _ = load(out / case["label"])
    reference, reference_affine = load_research_volume(DCMQI / "liver_seg.nrrd")
    expected, inside = resample_label_nearest(reference, reference_affine, image.shape, np.diag([-1, -1, 1, 1]) @ image_affine)
    assert inside > 0.99
    assert label.sum() > 100
    np.testing.assert_array_equal(label > 0, expected > 0)


def test_seg_found_inside_source(prepare, tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    for dicom in (DCMQI / "ct-3slice").iterdir():
        (source / dicom.name).write_bytes(dicom.read_bytes())
    (source / "seg.dcm").write_bytes((DCMQI / "liver.dcm").read_bytes())
    manifest, _ = prepare(source)
    (case,) = manifest["cases"]
    assert case["label"] is not None
    assert case["label_values"] == [0, 1]


def test_unmatched_seg_is_reported(prepare):
    manifest, _ = prepare(require(TOTALSEG / "example_ct_dicom"), labels=DCMQI / "liver.dcm")
    assert [entry["reason"] for entry in manifest["rejected"]] == ["seg_unresolved"]
    assert manifest["cases"][0]["label"] is None


def test_research_volume_with_mask_folder(prepare):
    models = require(TOTALSEG / "aorta_report" / "models")
    manifest, out = prepare(models / "ct_cropped.nii.gz", labels=models)
    (case,) = manifest["cases"]
    assert "aorta" in case["masks"]
    assert "ct_cropped" not in case["masks"]
    image, image_affine = load(out / case["image"])
    original, original_affine = load(models / "ct_cropped.nii.gz")
    np.testing.assert_array_equal(image, original)
    np.testing.assert_allclose(image_affine, original_affine, atol=1e-5)
    aorta, aorta_affine = load(out / case["masks"]["aorta"])
    np.testing.assert_allclose(aorta_affine, image_affine)
    assert aorta.shape == image.shape
    assert aorta.sum() > 0
    # Contrast-filled aorta is bright on this CT.
    assert np.median(image[aorta > 0]) > 100


def test_research_nrrd_and_mha(prepare, tmp_path):
    nrrd = require(DATA / "radiology" / "pyradiomics" / "brain1_image.nrrd")
    manifest, out = prepare(nrrd, labels=nrrd.parent / "brain1_label.nrrd")
    (case,) = manifest["cases"]
    assert case["label_values"][0] == 0 and len(case["label_values"]) >= 2
    image, affine = load(out / case["image"])
    original, original_affine = load_research_volume(nrrd)
    np.testing.assert_array_equal(image, original)
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ affine, original_affine, atol=1e-5)

    import itk

    mha = tmp_path / "volume.mha"
    itk.imwrite(itk.image_from_array(np.arange(60, dtype=np.int16).reshape(3, 4, 5)), str(mha))
    manifest, out = prepare(mha)
    (case,) = manifest["cases"]
    assert case["shape"] == [5, 4, 3]
