"""Demo data generators, checked through the real ``prepare dicom`` and ``prepare wsi`` steps.

Everything is generated into temporary folders, so no shared data is needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import openslide
import pydicom
import pytest
from shapely.geometry import Polygon, shape

from fedimaging.demo import generate_pathology_site, generate_radiology_site
from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom
from preprocessing.prepare_wsi import WsiOptions, prepare_wsi
from preprocessing.wsi.dataset import WsiTileDataset

N_SITES = 3
N_CASES = 2
N_SLIDES = 2
SEED = 7
TISSUES = ("liver", "aorta", "lesion")


def file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def series_headers(series_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(series_dir.iterdir())]


@pytest.fixture(scope="module")
def radiology(tmp_path_factory):
    """Three generated sites, each prepared with ``prepare dicom``: (summary, manifest, out) per site."""
    root = tmp_path_factory.mktemp("radiology")
    sites = []
    for site_index in range(N_SITES):
        summary = generate_radiology_site(root / f"site-{site_index + 1}", site_index=site_index,
                                          n_cases=N_CASES, seed=SEED)
        out = root / f"prepared-{site_index + 1}"
        manifest = prepare_dicom(PrepareOptions(source=Path(summary["dicom"]), out=out,
                                                labels=Path(summary["labels"]), key_file=root / "site.key"))
        sites.append((summary, manifest, out))
    return sites


@pytest.fixture(scope="module")
def pathology(tmp_path_factory):
    """Three generated sites, each prepared with ``prepare wsi``: (summary, manifest, datalist, out) per site."""
    root = tmp_path_factory.mktemp("pathology")
    sites = []
    for site_index in range(N_SITES):
        summary = generate_pathology_site(root / f"site-{site_index + 1}", site_index=site_index,
                                          n_slides=N_SLIDES, seed=SEED)
        out = root / f"prepared-{site_index + 1}"
        manifest = prepare_wsi(WsiOptions(source=Path(summary["slides_dir"]), out=out,
                                          annotations=Path(summary["annotations_dir"]), key_file=root / "site.key"))
        datalist = json.loads((out / "datalist.json").read_text())
        sites.append((summary, manifest, datalist, out))
    return sites


def tiles_by_class(datalist: dict, out: Path) -> dict[str, np.ndarray]:
    """All prepared tiles of a site as (n, 3, H, W) uint8 per class, read the way training reads them."""
    items = datalist["training"] + datalist["validation"]
    dataset = WsiTileDataset(items, out)
    tiles: dict[str, list] = {}
    for index, item in enumerate(items):
        tiles.setdefault(item["class_name"], []).append(dataset[index]["image"])
    dataset.close()
    return {name: np.stack(images) for name, images in tiles.items()}


def test_radiology_every_case_prepared_with_label(radiology):
    for summary, manifest, _ in radiology:
        site = summary["site_name"]
        assert manifest["summary"]["volumes"] == N_CASES, site
        assert manifest["rejected"] == [], site
        assert manifest["excluded"] == [], site
        assert manifest["skipped"] == [], site
        for case in manifest["cases"]:
            assert case["label"] is not None, (site, case["source"])
            assert case["label_values"] == [0, *sorted(summary["label_values"].values())], (site, case["source"])


def test_radiology_spacing_from_positions(radiology):
    for summary, manifest, _ in radiology:
        for case in manifest["cases"]:
            where = (summary["site_name"], case["source"])
            assert case["shape"] == summary["matrix"], where
            assert case["spacing_mm"] == pytest.approx(summary["spacing_mm"], abs=1e-6), where
            assert case["spacing_source"]["slice"] == "ImagePositionPatient", where
            assert case["spacing_source"]["in_plane"] == "PixelSpacing", where
            assert case["notes"] == [], where


def test_radiology_label_means_match_phantom(radiology):
    """The mean HU inside each label equals the phantom's value at that site.

    Tolerance: 1 HU plus four standard errors of the site's noise. The standard deviation inside a
    label must stay close to the noise level, because a label on the wrong voxels mixes tissues. As a
    control, the same check fails for the liver label flipped head to feet and the aorta label flipped
    left to right.
    """
    for summary, manifest, out in radiology:
        sigma = summary["noise_sigma_hu"]
        for case in manifest["cases"]:
            image = np.asarray(nib.load(out / case["image"]).dataobj).astype(np.float64)
            labels = np.asarray(nib.load(out / case["label"]).dataobj)
            for tissue in TISSUES:
                where = (summary["site_name"], case["source"], tissue)
                inside = labels == summary["label_values"][tissue]
                tolerance = 1.0 + 4.0 * sigma / np.sqrt(inside.sum())
                assert inside.sum() >= 20, where
                assert abs(image[inside].mean() - summary["expected_hu"][tissue]) <= tolerance, where
                assert image[inside].std() <= 1.25 * sigma + 1.0, where

            flipped_liver = np.flip(labels, axis=2) == summary["label_values"]["liver"]
            flipped_aorta = np.flip(labels, axis=0) == summary["label_values"]["aorta"]
            assert abs(image[flipped_liver].mean() - summary["expected_hu"]["liver"]) > 5.0, case["source"]
            assert abs(image[flipped_aorta].mean() - summary["expected_hu"]["aorta"]) > 5.0, case["source"]


def test_radiology_sites_differ_in_headers(radiology):
    first_files = []
    for summary, _, _ in radiology:
        first_files.append(series_headers(Path(summary["cases"][0]["series"]))[0])
    for keyword in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "PixelSpacing", "SliceThickness"):
        values = [str(ds[keyword].value) for ds in first_files]
        assert len(set(values)) == N_SITES, (keyword, values)
    transfer_syntaxes = [ds.file_meta.TransferSyntaxUID for ds in first_files]
    assert len(set(transfer_syntaxes)) == N_SITES, transfer_syntaxes
    assert any(uid.is_compressed for uid in transfer_syntaxes)
    assert {float(ds.RescaleIntercept) for ds in first_files} == {-1024.0, -1000.0}
    assert {ds.PixelRepresentation for ds in first_files} == {0, 1}
    assert {ds.PatientPosition for ds in first_files} == {"HFS", "FFS"}


def test_radiology_series_headers_per_site(radiology):
    """Slice order follows PatientPosition, and storage and identifiers follow the site profile."""
    for summary, _, _ in radiology:
        profile = summary["profile"]
        patient_ids = set()
        for case in summary["cases"]:
            headers = series_headers(Path(case["series"]))
            where = (summary["site_name"], case["case"])
            assert len(headers) == summary["matrix"][2], where
            by_instance = sorted(headers, key=lambda ds: int(ds.InstanceNumber))
            z = np.array([float(ds.ImagePositionPatient[2]) for ds in by_instance])
            steps = np.diff(z)
            expected_step = -profile["slice_thickness_mm"] if profile["patient_position"] == "HFS" \
                else profile["slice_thickness_mm"]
            assert steps == pytest.approx(np.full(steps.shape, expected_step), abs=1e-6), where

            first = by_instance[0]
            assert first.Modality == "CT", where
            assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"], where
            assert first.BitsAllocated == 16, where
            assert first.BitsStored == profile["bits_stored"], where
            assert first.HighBit == profile["bits_stored"] - 1, where
            assert str(first.PatientName).startswith(f"DEMO^SITE{summary['site_index'] + 1}^CASE"), where
            assert len({ds.SOPInstanceUID for ds in headers}) == len(headers), where
            assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in headers), where
            assert len({ds.SeriesInstanceUID for ds in headers}) == 1, where
            patient_ids.add(first.PatientID)

            stored = np.stack([ds.pixel_array for ds in by_instance])
            if profile["pixel_representation"] == 1:
                # Noise in air goes below the intercept, so a signed site stores negative values.
                assert stored.min() < 0, where
            else:
                assert stored.dtype == np.uint16, where
        assert len(patient_ids) == N_CASES, summary["site_name"]


def test_radiology_regenerates_identical_files(tmp_path):
    for site_index in range(N_SITES):
        first = tmp_path / f"a{site_index}"
        second = tmp_path / f"b{site_index}"
        other_seed = tmp_path / f"c{site_index}"
        generate_radiology_site(first, site_index=site_index, n_cases=1, seed=SEED)
        generate_radiology_site(second, site_index=site_index, n_cases=1, seed=SEED)
        generate_radiology_site(other_seed, site_index=site_index, n_cases=1, seed=SEED + 1)
        digests = file_digests(first)
        assert digests == file_digests(second), site_index
        assert digests["labels/" + f"site{site_index + 1}-case001_seg.nii.gz"] != \
            file_digests(other_seed)["labels/" + f"site{site_index + 1}-case001_seg.nii.gz"], site_index


def test_radiology_stale_case_folder_rejected(tmp_path):
    summary = generate_radiology_site(tmp_path, site_index=0, n_cases=1, seed=SEED)
    (Path(summary["cases"][0]["series"]) / "IM-9999-9999.dcm").write_bytes(b"left over from another run")
    with pytest.raises(FileExistsError, match="IM-9999-9999.dcm"):
        generate_radiology_site(tmp_path, site_index=0, n_cases=1, seed=SEED)


def test_demo_generators_reject_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        generate_radiology_site(tmp_path, site_index=0, n_cases=0, seed=SEED)
    with pytest.raises(ValueError, match="site_index"):
        generate_radiology_site(tmp_path, site_index=-1, n_cases=1, seed=SEED)
    with pytest.raises(ValueError, match="n_slides"):
        generate_pathology_site(tmp_path, site_index=0, n_slides=0, seed=SEED)
    with pytest.raises(ValueError, match="size"):
        generate_pathology_site(tmp_path, site_index=0, n_slides=1, seed=SEED, size=(512, 512))


def test_pathology_slides_open_in_openslide(pathology):
    for summary, _, _, _ in pathology:
        for slide_info in summary["slides"]:
            with openslide.OpenSlide(slide_info["slide"]) as slide:
                where = slide_info["name"]
                assert slide.properties["openslide.vendor"] == "generic-tiff", where
                assert slide.dimensions == tuple(slide_info["size"]), where
                assert slide.level_count == 3, where
                assert slide.level_downsamples == pytest.approx([1.0, 4.0, 16.0], rel=1e-3), where
                assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5), where
                assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5), where
                assert slide.properties["tiff.ResolutionUnit"] == "centimeter", where


def test_pathology_annotations_are_qupath_polygons(pathology):
    for summary, _, _, _ in pathology:
        for slide_info in summary["slides"]:
            where = slide_info["name"]
            payload = json.loads(Path(slide_info["annotation"]).read_text())
            assert payload["type"] == "FeatureCollection", where
            width, height = slide_info["size"]
            bounds = Polygon([(0, 0), (width, 0), (width, height), (0, height)])
            regions: dict[str, list] = {"Tumour": [], "Stroma": []}
            for feature in payload["features"]:
                assert feature["geometry"]["type"] == "Polygon", where
                assert feature["properties"]["objectType"] == "annotation", where
                geometry = shape(feature["geometry"])
                assert geometry.is_valid, where
                assert bounds.contains(geometry), where
                regions[feature["properties"]["classification"]["name"]].append(geometry)
            assert len(regions["Tumour"]) == slide_info["regions"]["Tumour"] >= 1, where
            assert len(regions["Stroma"]) == slide_info["regions"]["Stroma"] >= 1, where
            for tumour in regions["Tumour"]:
                # Each nest is a hole of exactly one stroma region, so the regions never overlap.
                assert any(Polygon(stroma.exterior).contains(tumour) for stroma in regions["Stroma"]), where
                assert all(stroma.intersection(tumour).area < 1.0 for stroma in regions["Stroma"]), where


def test_pathology_prepare_keeps_labelled_tissue_tiles(pathology):
    for summary, manifest, datalist, out in pathology:
        site = summary["site_name"]
        assert manifest["summary"]["slides"] == N_SLIDES, site
        assert manifest["rejected"] == [], site
        assert datalist["classes"] == ["Stroma", "Tumour"], site
        items = datalist["training"] + datalist["validation"]
        assert {item["class_name"] for item in items} == {"Stroma", "Tumour"}, site
        for slide in manifest["slides"]:
            assert slide["mpp_source"].startswith("openslide.mpp-x/y"), site
            assert slide["level"] == 0, site
            assert slide["tiles_kept"] < slide["tiles_total"], site
        # Independent of the tissue mask of prepare wsi: most pixels of a kept tile are not background white.
        for class_name, tiles in tiles_by_class(datalist, out).items():
            non_white = (tiles.min(axis=1) < 235).mean(axis=(1, 2))
            assert non_white.min() >= 0.4, (site, class_name)


def test_pathology_tumour_tiles_darker_purple(pathology):
    stroma_colours = []
    for summary, _, datalist, out in pathology:
        site = summary["site_name"]
        tiles = tiles_by_class(datalist, out)
        tumour, stroma = tiles["Tumour"].astype(np.float64), tiles["Stroma"].astype(np.float64)
        assert tumour.mean() < stroma.mean() - 20.0, site
        # Haematoxylin-rich tissue has a blue minus red difference well above eosin-rich tissue.
        tumour_blue_minus_red = (tumour[:, 2] - tumour[:, 0]).mean()
        stroma_blue_minus_red = (stroma[:, 2] - stroma[:, 0]).mean()
        assert tumour_blue_minus_red > stroma_blue_minus_red + 10.0, site
        # Per tile: most tumour tiles are darker than the median stroma tile.
        stroma_median = np.median(stroma.mean(axis=(1, 2, 3)))
        assert np.mean(tumour.mean(axis=(1, 2, 3)) < stroma_median) >= 0.9, site
        stroma_colours.append(stroma.mean(axis=(0, 2, 3)))
    for first in range(N_SITES):
        for second in range(first + 1, N_SITES):
            difference = np.abs(stroma_colours[first] - stroma_colours[second]).max()
            assert difference > 5.0, (first, second, stroma_colours[first], stroma_colours[second])


def test_pathology_regenerates_identical_files(tmp_path):
    first = generate_pathology_site(tmp_path / "a", site_index=1, n_slides=1, seed=SEED)
    generate_pathology_site(tmp_path / "b", site_index=1, n_slides=1, seed=SEED)
    other_seed = generate_pathology_site(tmp_path / "c", site_index=1, n_slides=1, seed=SEED + 1)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    assert Path(first["slides"][0]["slide"]).read_bytes() != Path(other_seed["slides"][0]["slide"]).read_bytes()


STRONG_SITES = 4


@pytest.fixture(scope="module")
def strong_radiology(tmp_path_factory):
    """Four sites of the strong variation, one small case each, prepared with ``prepare dicom``."""
    root = tmp_path_factory.mktemp("strong")
    sites = []
    for site_index in range(STRONG_SITES):
        summary = generate_radiology_site(root / f"site-{site_index + 1}", site_index=site_index, n_cases=1,
                                          seed=SEED, image_size=96, n_slices=32, variation="strong")
        out = root / f"prepared-{site_index + 1}"
        manifest = prepare_dicom(PrepareOptions(source=Path(summary["dicom"]), out=out,
                                                labels=Path(summary["labels"]), key_file=root / "site.key"))
        sites.append((summary, manifest, out))
    return sites


def test_strong_variation_gives_each_site_own_appearance(strong_radiology):
    appearances = [summary["appearance"] for summary, _, _ in strong_radiology]
    assert all(appearance is not None for appearance in appearances)
    # The fourth site is not a repeat of the first, although its DICOM profile is.
    keys = {(a["phase"], a["pixel_spacing_mm"], a["slice_thickness_mm"], a["noise_sigma_hu"]) for a in appearances}
    assert len(keys) == STRONG_SITES
    liver_hu = [summary["expected_hu"]["liver"] for summary, _, _ in strong_radiology[:3]]
    assert max(liver_hu) - min(liver_hu) >= 50.0, liver_hu
    assert strong_radiology[0][0]["profile"]["manufacturer"] == strong_radiology[3][0]["profile"]["manufacturer"]


def test_strong_variation_lesion_contrast_follows_phase(strong_radiology):
    """Arterial-phase lesions are brighter than their liver, the other phases' lesions darker."""
    from scipy.ndimage import binary_erosion

    for summary, manifest, out in strong_radiology:
        (case,) = manifest["cases"]
        image = np.asarray(nib.load(out / case["image"]).dataobj).astype(np.float64)
        labels = np.asarray(nib.load(out / case["label"]).dataobj)
        values = summary["label_values"]
        where = (summary["site_name"], summary["appearance"]["phase"])
        lesion = labels == values["lesion"]
        # In-plane erosion keeps the liver's edge, which the kernel blur mixes with fat and soft tissue, out
        # of the mean. Thick slices at some sites leave too few slices to erode along z as well.
        liver_core = binary_erosion(labels == values["liver"], structure=np.ones((3, 3, 1), dtype=bool), iterations=2)
        assert lesion.sum() >= 20, where
        assert liver_core.sum() >= 50, where
        expected = summary["expected_hu"]
        assert abs(image[liver_core].mean() - expected["liver"]) <= 10.0, where
        if expected["lesion"] > expected["liver"]:
            assert image[lesion].mean() > image[liver_core].mean() + 20.0, where
        else:
            assert image[lesion].mean() < image[liver_core].mean() - 20.0, where


def test_strong_variation_regenerates_identical_files(tmp_path):
    for run in ("a", "b"):
        generate_radiology_site(tmp_path / run, site_index=4, n_cases=1, seed=SEED, image_size=48, n_slices=16,
                                variation="strong")
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")


def test_demo_variation_is_default(tmp_path):
    default = generate_radiology_site(tmp_path / "default", site_index=1, n_cases=1, seed=SEED, image_size=48,
                                      n_slices=16)
    explicit = generate_radiology_site(tmp_path / "demo", site_index=1, n_cases=1, seed=SEED, image_size=48,
                                       n_slices=16, variation="demo")
    assert default["appearance"] is None
    assert file_digests(tmp_path / "default") == file_digests(tmp_path / "demo")


def test_radiology_rejects_unknown_variation(tmp_path):
    with pytest.raises(ValueError, match="variation"):
        generate_radiology_site(tmp_path, site_index=0, n_cases=1, seed=SEED, variation="extreme")
