"""A PyTorch dataset that reads tiles lazily from slides (or pre-cut tile files) listed in a datalist.

Each worker process opens a slide once and keeps it open; handles opened before a fork are not reused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from preprocessing.wsi.tile_reader import read_tile


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
