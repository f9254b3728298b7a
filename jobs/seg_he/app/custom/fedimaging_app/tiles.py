"""Tiles for training: read from a slide at a level (white outside the slide), or from tile files.

``read_tile`` is the one place that turns prepared tile coordinates into pixels; ``fedimaging prepare
wsi --export-tiles`` and the training dataset both call it, so exported and trained pixels agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

WHITE = (255, 255, 255)


def read_tile(slide, location: tuple[int, int], level: int, read_size: tuple[int, int], tile_size: int) -> np.ndarray:
    """Return the tile as (rows, columns, 3) uint8, resized to ``tile_size`` when ``read_size`` differs.

    Compositing and resizing stay in Pillow: converting the RGBA region to numpy first costs more than
    reading it. Only the alpha band is checked for transparency (a third of the cost of all four
    bands). A read exactly k times the tile size is shrunk by averaging k x k blocks (Pillow's
    ``reduce``, a box filter); other sizes use the bilinear filter, with ``reducing_gap=2`` letting
    Pillow shrink by whole factors first.
    """
    region = slide.read_region((int(location[0]), int(location[1])), int(level), (int(read_size[0]), int(read_size[1])))
    alpha_low, _ = region.getchannel("A").getextrema()
    if alpha_low == 255:
        image = region.convert("RGB")
    else:  # outside the slide OpenSlide returns transparent pixels: lay them on white
        image = Image.alpha_composite(Image.new("RGBA", region.size, WHITE + (255,)), region).convert("RGB")
    if image.size != (tile_size, tile_size):
        factor = image.size[0] // tile_size
        if factor > 1 and image.size == (factor * tile_size, factor * tile_size):
            image = image.reduce(factor)
        else:
            image = image.resize((tile_size, tile_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image)


class WsiTileDataset(Dataset):
    """Tiles from ``prepare wsi`` datalist items, as ``{"image": uint8 (3, H, W), "label": int}``.

    ``root`` is the prepared folder the items' paths are relative to. Items with ``location`` are read
    from the slide at ``level`` (``size`` level pixels, white outside the slide, resized to
    ``tile_size``); other items are tile image files.
    """

    def __init__(self, items: list[dict], root: Path, transform: Callable | None = None, max_open_slides: int = 16):
        self.items = items
        self.root = Path(root)
        self.transform = transform
        self.max_open_slides = max_open_slides
        self._slides: dict[str, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def _slide(self, relative_path: str):
        import openslide

        if self._pid != os.getpid():  # forked into a worker: never share OpenSlide handles
            self._slides, self._pid = {}, os.getpid()
        slide = self._slides.get(relative_path)
        if slide is None:
            if len(self._slides) >= self.max_open_slides:
                oldest = next(iter(self._slides))
                self._slides.pop(oldest).close()
            slide = openslide.OpenSlide(str(self.root / relative_path))
            self._slides[relative_path] = slide
        return slide

    def read_pixels(self, item: dict) -> np.ndarray:
        """Return the item's tile as (rows, columns, 3) uint8."""
        if "location" in item:
            return read_tile(self._slide(item["image"]), tuple(item["location"]), item["level"],
                             tuple(item["size"]), item["tile_size"])
        with Image.open(self.root / item["image"]) as image:
            return np.asarray(image.convert("RGB"))

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        sample = {"image": np.ascontiguousarray(self.read_pixels(item).transpose(2, 0, 1)), "label": item.get("label", -1)}
        return self.transform(sample) if self.transform is not None else sample

    def close(self) -> None:
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()
