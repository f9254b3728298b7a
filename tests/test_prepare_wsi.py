"""``fedimaging prepare wsi`` on real slides, the pyramid fault case and the Kather tiles."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
import subprocess
import sys

import numpy as np
import openslide
import pytest
from PIL import Image

from preprocessing.prepare_wsi import WsiOptions, prepare_wsi
from preprocessing.wsi.dataset import WsiTileDataset
from tests.conftest import CASES, DATA, require

SLIDES = DATA / "pathology" / "slides"
FIXTURES = DATA / "pathology" / "openslide_fixtures"
KATHER = DATA / "pathology" / "tiles" / "kather2016"
CMU = SLIDES / "cmu_small_region.svs"
NDPI = SLIDES / "test3-DAPI-2-(387).ndpi"
PYRAMID = CASES / "09-wsi-pyramid"


@pytest.fixture
def prepare_slides(tmp_path):
    counter = {"n": 0}

    def run(source, **kwargs):
        counter["n"] += 1
        out = tmp_path / f"wsi{counter['n']}"
        manifest = prepare_wsi(WsiOptions(source=source, out=out, key_file=tmp_path / "site.key", **kwargs))
        datalist = json.loads((out / "datalist.json").read_text())
        return manifest, datalist, out

    return run


def slide_folder(tmp_path, *slides):
    folder = tmp_path / "source"
    folder.mkdir(exist_ok=True)
    for slide in slides:
        shutil.copy(require(slide), folder / slide.name)
    return folder


def independent_tissue_fraction(slide, tile):
    """Tissue fraction of a tile from a 1/32 image and a plain rule: any channel below 200 is tissue."""
    scale = 32
    thumbnail = np.asarray(slide.get_thumbnail((slide.dimensions[0] // scale, slide.dimensions[1] // scale)).convert("RGB"))
    sx, sy = thumbnail.shape[1] / slide.dimensions[0], thumbnail.shape[0] / slide.dimensions[1]
    x0, y0 = int(tile["x0"] * sx), int(tile["y0"] * sy)
    x1, y1 = math.ceil((tile["x0"] + tile["w0"]) * sx), math.ceil((tile["y0"] + tile["h0"]) * sy)
    window = thumbnail[y0:y1, x0:x1]
    full = max(1, (y1 - y0) * (x1 - x0))
    return float((window.min(axis=-1) < 200).sum()) / full


def test_cmu_tiles_on_tissue_only(prepare_slides):
    manifest, datalist, out = prepare_slides(require(CMU), mpp=0.5, tile_size=224)
    (slide,) = manifest["slides"]
    assert slide["level"] == 0
    assert slide["mpp_source"].startswith("openslide.mpp")
    assert slide["tissue_mode"] == "brightfield"
    items = datalist["training"] + datalist["validation"]
    assert 0 < len(items) < slide["tiles_total"]

    kept = {tuple(item["location"]) for item in items}
    columns, rows = slide["grid_columns_rows"]
    # 0.499 µm/px is within 1 % of the target, so level 0 is read as is and a tile spans 224 level-0 pixels.
    assert slide["resampled"] is False
    step = 224 * slide["level_downsample"][0]
    agreement = []
    with openslide.OpenSlide(str(CMU)) as handle:
        for row in range(rows):
            for column in range(columns):
                tile = {"x0": round(column * step), "y0": round(row * step), "w0": step, "h0": step}
                independent = independent_tissue_fraction(handle, tile) >= 0.5
                agreement.append(independent == ((tile["x0"], tile["y0"]) in kept))
    assert np.mean(agreement) >= 0.9, f"kept tiles agree with the independent estimate on {np.mean(agreement):.2f}"
    assert (out / slide["thumbnail"]).stat().st_size > 0


def test_slide_without_mpp_needs_override(prepare_slides):
    manifest, _, _ = prepare_slides(require(SLIDES / "tcga-cr-7395-01a-01-ts1.svs"))
    (rejected,) = manifest["rejected"]
    assert rejected["reason"] == "no_mpp"
    assert "--assume-mpp" in rejected["message"]
    assert "tcga-cr-7395-01a-01-ts1.svs" in rejected["message"]

    manifest, datalist, _ = prepare_slides(SLIDES / "tcga-cr-7395-01a-01-ts1.svs", assume_mpp=0.5)
    (slide,) = manifest["slides"]
    assert slide["mpp_source"] == "--assume-mpp"
    assert slide["level"] == 0
    assert slide["tiles_kept"] > 0


def test_broken_slides_rejected_batch_continues(tmp_path, prepare_slides):
    source = slide_folder(tmp_path, CMU, SLIDES / "broken.svs", FIXTURES / "unreadable.svs", FIXTURES / "unopenable.tiff")
    manifest, datalist, _ = prepare_slides(source)
    reasons = {entry["path"]: entry["reason"] for entry in manifest["rejected"]}
    assert reasons == {"broken.svs": "unreadable_slide", "unreadable.svs": "unreadable_slide",
                       "unopenable.tiff": "unreadable_slide"}
    for entry in manifest["rejected"]:
        assert entry["path"] in entry["message"]
    assert [s["source"] for s in manifest["slides"]] == ["cmu_small_region.svs"]
    assert datalist["training"] or datalist["validation"]


def test_ndpi_read_from_right_level(tmp_path, prepare_slides):
    source = slide_folder(tmp_path, NDPI)
    manifest, datalist, out = prepare_slides(source, mpp=0.5)
    (slide,) = manifest["slides"]
    assert slide["mpp_level0"][0] == pytest.approx(0.22818, abs=1e-4)
    # Level 1 is 0.456 µm/px; level 2 (0.913) is coarser than the target, so level 1 is read and resampled.
    assert slide["level"] == 1
    assert slide["resampled"] is True
    assert slide["effective_mpp"] == [0.5, 0.5]
    assert slide["tissue_mode"] == "fluorescence"
    items = datalist["training"] + datalist["validation"]
    assert items and all(item["size"] == [round(224 * 0.5 / slide["level_mpp"][0])] * 2 for item in items)
    text = (out / "datalist.json").read_text()
    # No part of the file name; "387" alone could occur in a random hexadecimal pseudonym.
    assert "DAPI" not in text
    assert "(387)" not in text
    assert "test3" not in text

    pixels = WsiTileDataset(items, out)[0]["image"]
    assert pixels.shape == (3, 224, 224)


def test_pyramid_case_values(prepare_slides):
    truth = json.loads((require(PYRAMID) / "expected.json").read_text())
    manifest, datalist, out = prepare_slides(PYRAMID, mpp=truth["target_mpp_um"], tile_size=truth["tile_size"],
                                             tissue_threshold=0.0)
    (slide,) = manifest["slides"]
    assert slide["source"] == "slide_cm_resolution.tif"
    assert slide["mpp_level0"] == pytest.approx([0.25, 0.25])
    assert slide["level"] == truth["chosen_level"]
    assert slide["effective_mpp"] == pytest.approx(truth["actual_mpp_at_chosen_level_um"], abs=1e-5)
    assert slide["grid_columns_rows"] == truth["tile_grid_cols_rows"]

    (rejected,) = manifest["rejected"]
    assert rejected["path"] == "slide_no_mpp.tif"
    assert "ResolutionUnit NONE" in rejected["message"]
    assert "--assume-mpp" in rejected["message"]

    items = {tuple(item["location"]): item for item in datalist["training"] + datalist["validation"]}
    dataset = WsiTileDataset(list(items.values()), out)
    downsample = slide["level_downsample"]
    for expected in truth["tiles"]:
        location = (round(expected["tx"] * 128 * downsample[0]), round(expected["ty"] * 128 * downsample[1]))
        item = items[location]
        pixels = dataset.read_pixels(item)
        assert pixels.shape == (128, 128, 3)
        # Padding beyond the slide border is white.
        valid_w, valid_h = expected["valid_w"], expected["valid_h"]
        assert np.all(pixels[:, valid_w:] == 255)
        assert np.all(pixels[valid_h:, :] == 255)
        # The case's own tissue rule, applied to what the loader returns.
        fraction = float((pixels.min(axis=-1) < 220).mean())
        assert fraction == pytest.approx(expected["tissue_fraction_of_full_tile"], abs=6e-4)


def test_kather_tiles_become_datalist(prepare_slides):
    manifest, datalist, out = prepare_slides(require(KATHER), assume_mpp=0.495)
    assert manifest["mode"] == "tiles"
    assert len(datalist["classes"]) == 8
    assert "TUMOR" in datalist["classes"]
    assert "STROMA" in datalist["classes"]
    items = datalist["training"] + datalist["validation"]
    assert len(items) == 24
    assert sorted({item["label"] for item in items}) == list(range(8))
    assert "CRC-Prim" not in (out / "datalist.json").read_text()
    sample = WsiTileDataset(items, out)[0]
    assert sample["image"].shape == (3, 150, 150)

    manifest, _, _ = prepare_slides(KATHER)
    assert manifest["summary"]["rejected_by_reason"] == {"no_mpp": 24}


def test_geojson_annotation_labels_tiles(tmp_path, prepare_slides):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    region = [[400, 600], [1500, 600], [1500, 1800], [400, 1800], [400, 600]]
    (annotations / "cmu_small_region.geojson").write_text(json.dumps({
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [region]},
                      "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}],
    }))
    source = slide_folder(tmp_path, CMU)
    unlabelled, unlabelled_list, _ = prepare_slides(source)
    manifest, datalist, _ = prepare_slides(source, annotations=annotations)
    items = datalist["training"] + datalist["validation"]
    assert items and {item["class_name"] for item in items} == {"Tumor"}
    for item in items:
        step = 224
        centre = (item["location"][0] + step / 2, item["location"][1] + step / 2)
        assert 400 <= centre[0] <= 1500
        assert 600 <= centre[1] <= 1800
    all_tiles = unlabelled_list["training"] + unlabelled_list["validation"]
    assert len(items) < len(all_tiles)

    _, with_background, _ = prepare_slides(source, annotations=annotations, background_class="Other")
    classes = [item["class_name"] for item in with_background["training"] + with_background["validation"]]
    assert classes.count("Tumor") == len(items)
    assert classes.count("Other") == len(all_tiles) - len(items)


def test_workers_and_export_match_loader(tmp_path, prepare_slides):
    source = slide_folder(tmp_path, CMU, NDPI)
    single, single_list, out_single = prepare_slides(source)
    # Resize a tile here first: torch then runs its thread pool in this process, which forked workers
    # must not enter (they hung before workers were limited to one thread).
    items = single_list["training"] + single_list["validation"]
    resized = next(item for item in items if item["size"] != [item["tile_size"]] * 2)
    assert WsiTileDataset([resized], out_single)[0]["image"].shape == (3, 224, 224)
    double, double_list, out = prepare_slides(source, workers=2, export_tiles=True)
    strip = lambda d: [{k: v for k, v in item.items() if k != "tile_image"} for item in d["training"] + d["validation"]]
    assert strip(single_list) == strip(double_list)

    from PIL import Image

    items = double_list["training"] + double_list["validation"]
    dataset = WsiTileDataset(items, out)
    for item in items[:5]:
        exported = np.asarray(Image.open(out / item["tile_image"]))
        np.testing.assert_array_equal(exported, dataset.read_pixels(item))
    with openslide.OpenSlide(str(CMU)) as handle:
        item = next(i for i in items if i["slide_id"] == items[0]["slide_id"])
        bare = np.asarray(handle.read_region(tuple(item["location"]), item["level"], tuple(item["size"])).convert("RGB"))
        if item["size"] == [item["tile_size"]] * 2:
            np.testing.assert_array_equal(dataset.read_pixels(item), bare)


def test_cli_wsi_exit_codes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fedimaging", "prepare", "wsi", *args],
                              capture_output=True, text=True, timeout=300, check=False)

    ok = run(str(require(CMU)), "--out", str(tmp_path / "a"), "--key-file", str(tmp_path / "k"))
    assert ok.returncode == 0, ok.stderr
    assert "prepared 1 slide(s)" in ok.stdout
    bad = run(str(SLIDES / "broken.svs"), "--out", str(tmp_path / "b"), "--key-file", str(tmp_path / "k"))
    assert bad.returncode == 1
    # Each rejection is printed with the message that names the file, not only counted.
    assert "rejected (unreadable_slide): " in bad.stdout
    assert "broken.svs" in bad.stdout
    wrong = run(str(CMU), "--out", str(tmp_path / "c"), "--mpp", "-1", "--key-file", str(tmp_path / "k"))
    assert wrong.returncode == 2
    assert "--mpp -1" in wrong.stderr


def test_slide_labels_csv_and_patient_split(tmp_path, prepare_slides):
    source = slide_folder(tmp_path, CMU, NDPI, SLIDES / "tcga-cr-7395-01a-01-ts1.svs", SLIDES / "broken.svs",
                          PYRAMID / "slide_cm_resolution.tif")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label,patient\ncmu_small_region.svs,tumour,P-1\ntest3-DAPI-2-(387),normal,P-1\n"
                      "scan_0042.svs,normal,P-2\n")
    manifest, datalist, _ = prepare_slides(source, labels=labels, val_fraction=0.5)

    # A slide that cannot be read or has no resolution is reported as such before its missing label,
    # and a row that matches no slide is reported too.
    reasons = {entry["path"]: entry["reason"] for entry in manifest["rejected"]}
    assert reasons == {"tcga-cr-7395-01a-01-ts1.svs": "no_mpp", "broken.svs": "unreadable_slide",
                       "slide_cm_resolution.tif": "label_missing", "labels.csv": "label_unmatched"}
    unmatched = next(entry for entry in manifest["rejected"] if entry["reason"] == "label_unmatched")
    assert "scan_0042.svs" in unmatched["message"]
    assert datalist["classes"] == ["normal", "tumour"]
    by_slide = {slide["source"]: slide for slide in manifest["slides"]}
    assert by_slide["cmu_small_region.svs"]["slide_class"] == "tumour"
    # Both slides belong to one patient, so they land on the same side of the split.
    assert len({slide["split"] for slide in manifest["slides"]}) == 1
    items = datalist["training"] + datalist["validation"]
    assert {item["label"] for item in items} == {0, 1}


@pytest.mark.parametrize("path, level, read_size, tile_size", [
    (CMU, 0, (224, 224), 224),  # read as is
    (CMU, 0, (448, 448), 224),  # whole-factor reduction
    (NDPI, 1, (245, 245), 224),  # fractional shrink
    (PYRAMID / "slide_cm_resolution.tif", 1, (128, 128), 128),  # pyramid level with borders
    (PYRAMID / "slide_cm_resolution.tif", 0, (100, 100), 128),  # enlarging
])
def test_loader_fast_path_matches_public_path(path, level, read_size, tile_size):
    """The loader's direct ARGB read gives the pixels of openslide-python's public path, borders included."""
    from fedimaging_app.tiles import _read_tile_public, read_tile

    with openslide.OpenSlide(str(require(path))) as slide:
        width, height = slide.dimensions
        step = max(1, min(width, height) // 4)
        # Inside the slide, across its right and bottom borders, and wholly outside it.
        locations = [(x, y) for x in range(0, width, step) for y in range(0, height, step)]
        locations += [(width - 40, height - 40), (width + 10, 0), (-30, -30)]
        transparent_seen = False
        for location in locations:
            public = _read_tile_public(slide, location, level, read_size, tile_size, False)
            fast = read_tile(slide, location, level, read_size, tile_size)
            alpha = np.asarray(slide.read_region(location, level, read_size).getchannel("A"))
            if read_size == (tile_size, tile_size) and np.any((alpha > 0) & (alpha < 255)):
                # Half-transparent edge pixels: the loader lays premultiplied colour on white exactly
                # (c + 255 - alpha). The public path first un-premultiplies with rounding, so they may differ by 1.
                partial = (alpha > 0) & (alpha < 255)
                assert np.abs(fast.astype(int) - public).max() <= 1
                np.testing.assert_array_equal(fast[~partial], public[~partial])
                continue
            np.testing.assert_array_equal(fast, public, err_msg=f"{path.name} at {location}")
            np.testing.assert_array_equal(read_tile(slide, location, level, read_size, tile_size, channels_first=True),
                                          public.transpose(2, 0, 1))
            transparent_seen |= bool(np.all(public == 255))
        assert fast.shape == (tile_size, tile_size, 3)
        assert transparent_seen  # a region outside the slide was read and is white


def test_loader_fallback_for_image_slide(tmp_path):
    from PIL import Image

    from fedimaging_app.tiles import read_tile

    rgba = np.zeros((60, 80, 4), dtype=np.uint8)
    rgba[:30, :, :] = (200, 10, 20, 255)  # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "half.png")
    with openslide.ImageSlide(str(tmp_path / "half.png")) as slide:
        pixels = read_tile(slide, (0, 0), 0, (80, 60), 40)
    assert pixels.shape == (40, 40, 3)
    assert np.all(pixels[:10] == (200, 10, 20))  # colour kept away from the edge
    assert np.all(pixels[-10:] == 255)  # transparent laid on white


def test_assume_mpp_only_fills_missing(tmp_path, prepare_slides):
    # One option for a mixed folder: the slide without a resolution takes it, the other keeps its own.
    source = slide_folder(tmp_path, CMU, SLIDES / "tcga-cr-7395-01a-01-ts1.svs")
    manifest, _, _ = prepare_slides(source, assume_mpp=0.25)
    assert not manifest["rejected"]
    by_source = {slide["mpp_source"]: slide for slide in manifest["slides"]}
    assert set(by_source) == {"--assume-mpp", "openslide.mpp-x/y (aperio metadata)"}
    assert by_source["--assume-mpp"]["mpp_level0"] == [0.25, 0.25]
    assert by_source["openslide.mpp-x/y (aperio metadata)"]["mpp_level0"][0] == pytest.approx(0.499)


def test_tile_resolution_wins_over_assume_mpp(tmp_path):
    from preprocessing.wsi.tiles_folder import load_tile

    pixels = np.full((40, 40, 3), 200, dtype=np.uint8)
    with_dpi, default_dpi = tmp_path / "with_dpi.png", tmp_path / "default_dpi.png"
    Image.fromarray(pixels).save(with_dpi, dpi=(50800, 50800))  # 25400 / 50800 = 0.5 µm per pixel
    Image.fromarray(pixels).save(default_dpi, dpi=(72, 72))
    own = load_tile(with_dpi, 0.5, assume_mpp=0.25)
    assert own.mpp == pytest.approx(0.5)
    assert own.mpp_source == "image resolution (dpi)"
    assert not own.resampled
    assumed = load_tile(default_dpi, 0.5, assume_mpp=0.25)
    assert assumed.mpp_source == "--assume-mpp"
    assert assumed.pixels.shape[:2] == (20, 20)


def test_rerun_replaces_earlier_outputs(tmp_path, prepare_slides):
    out = tmp_path / "out"
    prepare_wsi(WsiOptions(source=slide_folder(tmp_path, CMU, NDPI), out=out, key_file=tmp_path / "site.key"))
    assert len(list((out / "slides").iterdir())) == 2
    (out / "notes.txt").write_text("kept")
    manifest = prepare_wsi(WsiOptions(source=CMU, out=out, key_file=tmp_path / "site.key"))
    (slide,) = manifest["slides"]
    # Only the files of the new run remain in the generated folders; other files in OUT stay.
    assert [p.name for p in (out / "slides").iterdir()] == [Path(slide["image"]).name]
    assert [p.name for p in (out / "tiles").iterdir()] == [Path(slide["tiles"]).name]
    assert [p.name for p in (out / "thumbnails").iterdir()] == [Path(slide["thumbnail"]).name]
    assert (out / "notes.txt").read_text() == "kept"
    assert (out / "phi_identifiers.json").exists()
