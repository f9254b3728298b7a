"""Tiles for training: read from a slide at a level (white outside the slide), or from tile files.

``read_tile`` is the one place that turns prepared tile coordinates into pixels; ``fedimaging prepare
wsi --export-tiles`` and the training dataset both call it, so exported and trained pixels agree.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from ctypes import POINTER, c_uint32
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from fedimaging_app.batch_slots import SlotLoader

WHITE = (255, 255, 255)
# Byte positions of red, green, blue and alpha in OpenSlide's 32-bit ARGB pixels on a little-endian machine.
_R, _G, _B, _A = 2, 1, 0, 3


@functools.cache
def _c_read_region():
    """OpenSlide's C ``openslide_read_region`` as openslide-python binds it, or None where it is unusable.

    openslide-python's ``read_region`` un-premultiplies every pixel and builds an RGBA image that the
    loader would then convert again; reading the premultiplied ARGB buffer directly skips both. The
    binding is private to openslide-python (tested with 1.4), so a version without it, and any
    big-endian machine, uses the public path, which gives the same pixels.
    """
    if sys.byteorder != "little":
        return None
    try:
        from openslide import lowlevel

        return lowlevel._read_region
    except (ImportError, AttributeError):
        return None


def _read_argb(slide, location, level, size: tuple[int, int]) -> np.ndarray | None:
    """Read a region as (rows, columns) premultiplied ARGB uint32, or return None for the public path."""
    c_read, handle = _c_read_region(), getattr(slide, "_osr", None)
    if c_read is None or handle is None:  # not an openslide.OpenSlide (for example an ImageSlide)
        return None
    width, height = size
    pixels = np.empty((height, width), dtype=np.uint32)  # OpenSlide clears and fills every pixel
    c_read(handle, pixels.ctypes.data_as(POINTER(c_uint32)), int(location[0]), int(location[1]), int(level),
           width, height)
    return pixels


def _laid_out_hwc(pixels: np.ndarray, channels_first: bool) -> np.ndarray:
    """Return (rows, columns, 3) pixels as they are, or as contiguous (3, rows, columns)."""
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)) if channels_first else pixels


def _laid_out_chw(planes: np.ndarray, channels_first: bool) -> np.ndarray:
    """Return (3, rows, columns) planes as they are, or as contiguous (rows, columns, 3)."""
    return planes if channels_first else np.ascontiguousarray(planes.transpose(1, 2, 0))


def _bands_on_white(argb: np.ndarray, out: np.ndarray) -> None:
    """Write premultiplied ARGB pixels as (3, rows, columns) RGB into ``out``, laid on white.

    Premultiplied colour c over white is ``c + 255 - alpha``: transparent pixels outside the slide
    become white, opaque ones keep their colour.
    """
    octets = argb.view(np.uint8).reshape(argb.shape + (4,))
    alpha = octets[..., _A]
    for band, position in enumerate((_R, _G, _B)):
        out[band] = octets[..., position]
    if alpha.min() < 255:
        out += 255 - alpha  # cannot overflow: OpenSlide's premultiplied colour is at most alpha


def resize_planes(planes: torch.Tensor, tile_size: int, channels: list[int] | None = None) -> torch.Tensor:
    """Resize (1, channels, rows, columns) uint8 to contiguous (channels, tile_size, tile_size) uint8.

    Antialiased bilinear, the filter of Pillow's ``BILINEAR`` (values agree within 1), computed by
    torch's vectorised uint8 kernel, about three times faster than Pillow's. Every channel is resized
    alone; ``channels`` picks and orders the channels of the result (default: all, as given).

    Runs on one thread, because a tile is too small to gain from more. Once torch has used its
    thread pool, the idle pool threads also keep spinning on the other cores while the next region
    is read, which doubled the loader's CPU time per tile in ``benchmarks/bench_prepare_wsi.py``.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        resized = F.interpolate(planes, size=(tile_size, tile_size), mode="bilinear", antialias=True,
                                align_corners=False)[0]
        return (resized if channels is None else resized[channels]).contiguous()
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _whole_factor(size: tuple[int, int], tile_size: int) -> int:
    """k when ``size`` is exactly k x k tiles (k > 1), else 0."""
    factor = size[0] // tile_size
    return factor if factor > 1 and size == (factor * tile_size, factor * tile_size) else 0


def resize_bands(bands: np.ndarray, tile_size: int, channels_first: bool) -> np.ndarray:
    """Resize (3, rows, columns) RGB to the tile size (see ``read_tile``) and lay it out as asked."""
    size = (bands.shape[2], bands.shape[1])
    if size == (tile_size, tile_size):
        return _laid_out_chw(bands, channels_first)
    factor = _whole_factor(size, tile_size)
    if factor:
        image = Image.fromarray(_laid_out_chw(bands, channels_first=False))
        return _laid_out_hwc(np.asarray(image.reduce(factor)), channels_first)
    return _laid_out_chw(resize_planes(torch.from_numpy(bands)[None], tile_size).numpy(), channels_first)


def read_tile(slide, location: tuple[int, int], level: int, read_size: tuple[int, int], tile_size: int,
              channels_first: bool = False) -> np.ndarray:
    """Return the tile as uint8 (rows, columns, 3), or (3, rows, columns) with ``channels_first``.

    The region is read at ``level`` from level-0 ``location`` and laid on white where it is
    transparent (outside the slide). When ``read_size`` differs from ``tile_size`` it is resized: a
    region exactly k times the tile size by averaging k x k blocks (Pillow's ``reduce``), any other
    by antialiased bilinear interpolation (``resize_planes``).
    """
    size = (int(read_size[0]), int(read_size[1]))
    argb = _read_argb(slide, location, level, size)
    if argb is None:
        return _read_tile_public(slide, location, level, size, tile_size, channels_first)
    octets = argb.view(np.uint8).reshape(argb.shape + (4,))
    if size != (tile_size, tile_size) and octets[..., _A].min() == 255:
        # Opaque and resized: work on OpenSlide's buffer directly, without a separate RGB copy.
        factor = _whole_factor(size, tile_size)
        if factor:
            image = Image.frombuffer("RGB", size, argb, "raw", "BGRX", 0, 1)
            return _laid_out_hwc(np.asarray(image.reduce(factor)), channels_first)
        planes = resize_planes(torch.from_numpy(octets).permute(2, 0, 1)[None], tile_size, [_R, _G, _B])
        return _laid_out_chw(planes.numpy(), channels_first)
    bands = np.empty((3, size[1], size[0]), dtype=np.uint8)
    _bands_on_white(argb, bands)
    return resize_bands(bands, tile_size, channels_first)


def _read_tile_public(slide, location, level, size, tile_size, channels_first) -> np.ndarray:
    """``read_tile`` through openslide-python's public ``read_region`` (straight, not premultiplied, RGBA)."""
    region = slide.read_region((int(location[0]), int(location[1])), int(level), size)
    alpha_low, _ = region.getchannel("A").getextrema()
    if alpha_low == 255:
        image = region.convert("RGB")
    else:  # outside the slide OpenSlide returns transparent pixels: lay them on white
        image = Image.alpha_composite(Image.new("RGBA", region.size, WHITE + (255,)), region).convert("RGB")
    return resize_bands(_laid_out_hwc(np.asarray(image), channels_first=True), tile_size, channels_first)


def default_max_open_slides() -> int:
    """Return how many slides a loader process keeps open: 128, or fewer where few files may be open.

    An estimate: each handle takes one file descriptor, and a quarter of the process's limit is
    left for them.
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return 128
    if soft == resource.RLIM_INFINITY:
        return 128
    return max(16, min(128, soft // 4))


# Decoded slide tiles one loader process caches, shared by all its open slides. On a shuffled pass
# over 20 copies of the CMU sample, 128, 256 and 512 MiB read 0.89, 0.95 and 1.03 times as many
# tiles per second as handles with OpenSlide's own 32 MiB cache each (scratch runs, 2-core machine).
SLIDE_CACHE_BYTES = 256 * 1024 * 1024


class WsiTileDataset(Dataset):
    """Tiles from ``prepare wsi`` datalist items, as ``{"image": uint8 (3, H, W), "label": int}``.

    ``label`` is the item's class index, or -1 for an unlabelled item.

    ``root`` is the prepared folder the items' paths are relative to. Items with ``location`` are read
    from the slide at ``level`` (``size`` level pixels, white outside the slide, resized to
    ``tile_size``); other items are tile image files.

    Each process keeps up to ``max_open_slides`` slides open, closing the least recently read one
    first, because training draws tiles of all slides in random order, and opening a slide costs
    as much as reading several tiles (4.7 ms against 1.2 ms per tile on the CMU Aperio sample, a
    scratch measurement). All open slides of a process share one OpenSlide tile cache of
    ``SLIDE_CACHE_BYTES``. Without this, each handle would get its own, and many open slides would
    each fill one.
    """

    def __init__(self, items: list[dict], root: Path, transform: Callable | None = None,
                 max_open_slides: int | None = None):
        self.items = items
        self.root = Path(root)
        self.transform = transform
        self.max_open_slides = max_open_slides or default_max_open_slides()
        self._slides: dict[str, object] = {}
        self._cache = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # Open slides and their cache stay in the process that opened them.
        return {**self.__dict__, "_slides": {}, "_cache": None}

    def __len__(self) -> int:
        return len(self.items)

    def _slide(self, relative_path: str):
        import openslide

        if self._pid != os.getpid():  # forked into a worker: never share OpenSlide handles
            self._slides, self._cache, self._pid = {}, None, os.getpid()
        slide = self._slides.pop(relative_path, None)
        if slide is None:
            if len(self._slides) >= self.max_open_slides:
                least_recent = next(iter(self._slides))
                self._slides.pop(least_recent).close()
            slide = openslide.OpenSlide(str(self.root / relative_path))
            if hasattr(openslide, "OpenSlideCache"):  # openslide-python 1.3 with OpenSlide 4.0, or later
                if self._cache is None:
                    self._cache = openslide.OpenSlideCache(SLIDE_CACHE_BYTES)
                slide.set_cache(self._cache)
        self._slides[relative_path] = slide  # the most recently read slide comes last
        return slide

    def read_pixels(self, item: dict, channels_first: bool = False) -> np.ndarray:
        """Return the item's tile as uint8 (rows, columns, 3), or (3, rows, columns) with ``channels_first``."""
        if "location" in item:
            return read_tile(self._slide(item["image"]), tuple(item["location"]), item["level"],
                             tuple(item["size"]), item["tile_size"], channels_first=channels_first)
        with Image.open(self.root / item["image"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        return _laid_out_hwc(pixels, channels_first)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        sample = {"image": self.read_pixels(item, channels_first=True), "label": item.get("label", -1)}
        return self.transform(sample) if self.transform is not None else sample

    def close(self) -> None:
        for slide in self._slides.values():
            slide.close()
        self._slides.clear()


class WorkerBalancedBatchSampler(Sampler[list]):
    """Batches of ``batch_size`` items whose last ones are split so that every worker reads a fair share.

    A DataLoader hands batches to its worker processes in turn, and a pass lasts as long as the
    busiest worker. With the usual batching, 671 tiles in batches of 32 give one of 2 workers 11
    batches and the other 10. A pass of 43 tiles gives one worker 32 tiles and the other 11. This
    sampler keeps full batches while every worker gets the same number of them, and splits the rest
    (less than ``num_workers`` full batches) into ``num_workers`` batches of near-equal size. Every
    item of the pass is still yielded exactly once, in the order of ``sampler``. With 0 or 1 worker
    it batches like ``BatchSampler(sampler, batch_size, drop_last=False)``.
    """

    def __init__(self, sampler: Sampler, batch_size: int, num_workers: int):
        if batch_size < 1:
            raise ValueError(f"invalid batch_size {batch_size}: give 1 or more")
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)

    def _sizes(self, count: int) -> list[int]:
        full, rest = divmod(count, self.batch_size)
        if self.num_workers == 1:
            return [self.batch_size] * full + ([rest] if rest else [])
        full_kept = full - full % self.num_workers
        tail = count - full_kept * self.batch_size
        parts = min(self.num_workers, tail)
        return [self.batch_size] * full_kept + [tail // parts + (1 if i < tail % parts else 0) for i in range(parts)]

    def __iter__(self):
        order = list(self.sampler)
        start = 0
        for size in self._sizes(len(order)):
            yield order[start:start + size]
            start += size

    def __len__(self) -> int:
        return len(self._sizes(len(self.sampler)))


def tile_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0,
                generator: torch.Generator | None = None, sampler: Sampler | None = None) -> DataLoader:
    """Build the DataLoader that training and validation read tiles with.

    Worker processes persist across passes (rounds), the last batches of a pass are spread over
    the workers (:class:`WorkerBalancedBatchSampler`), and workers write batches into reused shared
    memory (:class:`fedimaging_app.batch_slots.SlotLoader`). ``sampler`` replaces the sequential or
    shuffled order.
    """
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = WorkerBalancedBatchSampler(sampler, batch_size, num_workers)
    if num_workers == 0:
        return DataLoader(dataset, batch_sampler=batches)
    return SlotLoader(dataset, batch_sampler=batches, batch_size=batch_size, num_workers=num_workers,
                      persistent_workers=True)
