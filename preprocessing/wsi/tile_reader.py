"""Read one tile from a slide: region at a level, white outside the slide, resized to the tile size."""

from __future__ import annotations

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)


def composite_on_white(region: Image.Image) -> np.ndarray:
    """Turn OpenSlide's RGBA region (transparent outside the slide) into RGB on white."""
    rgba = np.asarray(region)
    alpha = rgba[..., 3:4].astype(np.uint16)
    if np.all(alpha == 255):
        return np.ascontiguousarray(rgba[..., :3])
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
    return rgb.astype(np.uint8)


def read_tile(slide, location: tuple[int, int], level: int, read_size: tuple[int, int], tile_size: int) -> np.ndarray:
    """Return the tile as (rows, columns, 3) uint8, resized to ``tile_size`` when ``read_size`` differs."""
    region = slide.read_region((int(location[0]), int(location[1])), int(level), (int(read_size[0]), int(read_size[1])))
    rgb = composite_on_white(region)
    if rgb.shape[1] != tile_size or rgb.shape[0] != tile_size:
        rgb = np.asarray(Image.fromarray(rgb).resize((tile_size, tile_size), Image.Resampling.BILINEAR))
    return rgb
