"""Prepare one slide: resolution, level, tile grid, tissue, labels, thumbnail and optional tile export.

``process_slide`` takes and returns plain data so a process pool can run it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from preprocessing.reasons import Reason, Rejection
from preprocessing.wsi.annotations import read_regions
from preprocessing.wsi.grid import tile_grid
from preprocessing.wsi.resolution import choose_level, read_resolution
from preprocessing.wsi.tile_reader import read_tile
from preprocessing.wsi.tissue import tissue_fractions, tissue_mask

logger = logging.getLogger(__name__)

# The tissue mask has at least this many pixels across one tile, within the thumbnail size limits.
MASK_PIXELS_PER_TILE = 8
THUMBNAIL_MAX_SIDE = 4096
THUMBNAIL_MIN_SIDE = 256
# Longest side of the thumbnail PNG written for a person to check the kept tiles.
DISPLAY_THUMBNAIL_SIDE = 1024


@dataclass
class SlideJob:
    """Everything needed to prepare one slide (picklable)."""

    path: Path
    rel_path: str
    slide_id: str
    target_mpp: float
    tile_size: int
    tissue_threshold: float
    assume_mpp: float | None
    slide_class: str | None
    annotation_path: Path | None
    background_class: str | None
    thumbnail_path: Path
    export_dir: Path | None
    # Why the slide has no label (no CSV row, no GeoJSON file). It is reported only once the slide
    # has opened and its pixels read, so that an unreadable slide is reported as such first.
    missing_label: str | None = None


@dataclass
class SlideResult:
    """Tiles kept for one slide and the facts recorded in the manifest, or the rejection."""

    job: SlideJob
    tiles: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    reason: str | None = None
    message: str | None = None


def open_slide(path: Path, name: str):
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise Rejection(
            Reason.UNREADABLE_SLIDE,
            f"{name}: OpenSlide cannot open the slide ({exc}); check that the file is complete and in a "
            "supported format (Aperio, Hamamatsu, MIRAX, Leica, generic tiled TIFF, DICOM)",
        ) from exc


def _thumbnail(slide, tile_width0: float, name: str) -> np.ndarray:
    import openslide

    width0, height0 = slide.dimensions
    scale = MASK_PIXELS_PER_TILE / tile_width0
    side = max(width0, height0) * scale
    side = min(max(side, THUMBNAIL_MIN_SIDE), THUMBNAIL_MAX_SIDE, max(width0, height0))
    size = (max(1, math.ceil(width0 * side / max(width0, height0))), max(1, math.ceil(height0 * side / max(width0, height0))))
    try:
        return np.asarray(slide.get_thumbnail(size).convert("RGB"))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise Rejection(
            Reason.UNREADABLE_SLIDE, f"{name}: pixel data cannot be read ({exc}); re-export or re-scan the slide"
        ) from exc


def _draw_outlines(thumbnail: np.ndarray, tiles: list[dict], scale: tuple[float, float], path: Path) -> None:
    image = Image.fromarray(thumbnail)
    draw = ImageDraw.Draw(image)
    for tile in tiles:
        x0, y0 = tile["x0"] * scale[0], tile["y0"] * scale[1]
        x1, y1 = x0 + tile["width0"] * scale[0], y0 + tile["height0"] * scale[1]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 200, 0) if tile["class_name"] else (255, 210, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _prepare(job: SlideJob) -> SlideResult:
    name = job.path.name
    slide = open_slide(job.path, name)
    try:
        resolution = read_resolution(dict(slide.properties), name, job.assume_mpp)
        choice = choose_level(list(slide.level_dimensions), resolution, job.target_mpp, name)
        grid = tile_grid(slide.dimensions, slide.level_dimensions[choice.level], choice, job.tile_size, job.target_mpp)
        tile_width0 = grid.tiles[0].width0
        thumbnail = _thumbnail(slide, tile_width0, name)
        if job.missing_label is not None:
            raise Rejection(Reason.LABEL_MISSING, job.missing_label)
        tissue = tissue_mask(thumbnail, slide.dimensions)
        boxes = np.array([[t.x0, t.y0, t.width0, t.height0] for t in grid.tiles], dtype=np.float64)
        fractions = tissue_fractions(tissue, boxes)
        keep = np.flatnonzero(fractions >= job.tissue_threshold)

        if job.annotation_path is not None:
            regions = read_regions(job.annotation_path)
            centres = boxes[keep, :2] + boxes[keep, 2:] / 2
            classes = regions.classify(centres)
        else:
            classes = [job.slide_class] * len(keep)

        tiles = []
        for index, class_name in zip(keep, classes):
            if class_name is None and job.annotation_path is not None:
                if job.background_class is None:
                    continue
                class_name = job.background_class
            tile = grid.tiles[index]
            tiles.append({
                "x0": tile.x0, "y0": tile.y0, "level": grid.level,
                "width": grid.read_size[0], "height": grid.read_size[1], "tile_size": grid.tile_size,
                "mpp_x": choice.effective_mpp_xy[0], "mpp_y": choice.effective_mpp_xy[1],
                "class_name": class_name, "tissue_fraction": round(float(fractions[index]), 4),
                "width0": tile.width0, "height0": tile.height0,
            })
        if not tiles:
            raise Rejection(
                Reason.NO_TISSUE,
                f"{name}: no tile reaches the tissue fraction {job.tissue_threshold:g}"
                + (" inside an annotated region" if job.annotation_path is not None else "")
                + "; check the slide, or lower --tissue-threshold",
            )
        display = np.asarray(slide.get_thumbnail((DISPLAY_THUMBNAIL_SIDE, DISPLAY_THUMBNAIL_SIDE)).convert("RGB"))
        scale = (display.shape[1] / slide.dimensions[0], display.shape[0] / slide.dimensions[1])
        _draw_outlines(display, tiles, scale, job.thumbnail_path)
        if job.export_dir is not None:
            job.export_dir.mkdir(parents=True, exist_ok=True)
            for tile in tiles:
                pixels = read_tile(slide, (tile["x0"], tile["y0"]), tile["level"], (tile["width"], tile["height"]), tile["tile_size"])
                tile_path = job.export_dir / f"{tile['x0']}_{tile['y0']}.png"
                # Level 1 compresses about three times faster than the default, for files about a third larger.
                Image.fromarray(pixels).save(tile_path, compress_level=1)
                tile["tile_image"] = tile_path.name
        counts: dict[str, int] = {}
        for tile in tiles:
            name = "unlabelled" if tile["class_name"] is None else str(tile["class_name"])
            counts[name] = counts.get(name, 0) + 1
        info = {
            "mpp_level0": [resolution.mpp_x, resolution.mpp_y],
            "mpp_source": resolution.source,
            "level": choice.level,
            "level_downsample": list(choice.downsample_xy),
            "level_mpp": list(choice.level_mpp_xy),
            "effective_mpp": list(choice.effective_mpp_xy),
            "resampled": choice.resample,
            "level0_size": list(slide.dimensions),
            "grid_columns_rows": [grid.columns, grid.rows],
            "tissue_mode": tissue.mode,
            # Otsu's threshold on saturation for brightfield, the triangle threshold for fluorescence.
            "tissue_threshold_method": "otsu" if tissue.mode == "brightfield" else "triangle",
            "tissue_threshold": round(tissue.threshold, 4),
            "tiles_total": len(grid.tiles),
            "tiles_kept": len(tiles),
            "tiles_by_class": counts,
            "vendor": slide.properties.get("openslide.vendor"),
        }
        return SlideResult(job, tiles, info)
    finally:
        slide.close()


def process_slide(job: SlideJob) -> SlideResult:
    """Prepare one slide; a problem becomes a rejected result, never an exception."""
    try:
        return _prepare(job)
    except Rejection as rejection:
        return SlideResult(job, reason=rejection.reason.value, message=rejection.message)
    except Exception as exc:  # a corrupt slide can fail anywhere inside OpenSlide
        logger.exception("unexpected error while preparing %s", job.slide_id)
        return SlideResult(
            job, reason=Reason.UNREADABLE_SLIDE.value,
            message=f"{job.path.name}: reading the slide failed ({exc.__class__.__name__}: {exc}); re-export or re-scan it",
        )
