"""Benchmark ``fedimaging prepare wsi`` and its tile loader against a bare OpenSlide loop.

Three slides are measured in one run:

* ``cmu``: the CMU Aperio sample ``cmu_small_region.svs`` (2220x2967, JPEG, 0.499 µm/px, one level),
  read at level 0 without resampling.
* ``ndpi``: the Hamamatsu fluorescence sample ``test3-DAPI-2-(387).ndpi`` (0.228 µm/px at level 0),
  read at level 1 (0.456 µm/px) as 245x245 regions that are resized to 224x224.
* ``generated``: a pyramidal tiled TIFF that this script writes with tifffile into a temporary folder
  and deletes at the end. It is 20000x15000 RGB at 0.25 µm/px (resolution tags in centimetres), with
  256x256 deflate-compressed tiles and levels with downsample 1, 4 and 16. H&E-like pink tissue blobs
  lie on a white background. At 0.5 µm/px it is read at level 0 as 448x448 regions resized to 224x224.

For every slide the script prints, with the median of ``--repeats`` timed runs after one warm-up:

* tiling: ``prepare_wsi`` on the slide alone without tile export (slides/s), and with
  ``export_tiles`` (tiles/s of the whole step, and tiles/s of the export alone, which is the
  difference between the two medians);
* reading the tiles of the produced datalist with the project's tile loader ``WsiTileDataset``
  (the path training uses): indexed in one process, and through ``tile_loader`` (the torch
  ``DataLoader`` training builds, whose last batches of a pass are spread over the workers and
  whose workers write batches into reused shared memory) with ``num_workers=0`` and ``num_workers=2``;
* the baseline on the same items in the same run: a bare loop of ``OpenSlide.read_region`` plus
  ``.convert("RGB")``, in one process and split over a ``multiprocessing.Pool`` of 2 processes;
* both 2-process methods twice: with processes started in every pass, and with processes started
  once and kept for every pass (``persistent_workers=True``, as training reads tiles);
* for a slide with fewer than 640 kept tiles, the 1-process and persistent 2-process rows again
  on long passes: the kept tiles repeated until there are at least 640, each copy through its own
  symbolic link to the slide, so that each copy opens its own handle and starts with an empty
  cache. This measures throughput rather than the fixed cost of starting a pass. A second layout
  repeats only a whole number of batches of the kept tiles per copy, so that no copy is split
  between the two processes (``long_pass_layouts`` says why this matters on small slides). On that
  layout the 1-process loader and bare loop also read the tiles in one random order, as training
  draws them from all slides at once.

It also runs ``prepare_wsi`` on a folder holding all three slides with ``workers`` 1 and 2, with
and without export, because the step spreads work over processes one slide at a time.

The slide files are read many times, so after the warm-up they come from the page cache: the numbers
measure decoding, tissue detection and resizing, not disk speed. Each timed run opens fresh OpenSlide
handles, and OpenSlide 4.0 gives every new handle its own tile cache (32 MiB), so that cache starts
empty in every run.

Run from the repository root::

    python benchmarks/bench_prepare_wsi.py [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
import PIL
import PIL.Image
import tifffile
import torch
from skimage.filters import gaussian
from torch.utils.data import DataLoader

from preprocessing.output import DATALIST_NAME
from preprocessing.prepare_wsi import WsiOptions, prepare_wsi
from preprocessing.wsi.dataset import WsiTileDataset
from fedimaging_app.tiles import read_tile, resize_bands, tile_loader

REPO_ROOT = Path(__file__).resolve().parent.parent
SLIDE_FOLDER = REPO_ROOT.parent / "shared" / "data" / "pathology" / "slides"
CMU_SLIDE = SLIDE_FOLDER / "cmu_small_region.svs"
NDPI_SLIDE = SLIDE_FOLDER / "test3-DAPI-2-(387).ndpi"

TARGET_MPP = 0.5
TILE_SIZE = 224
BATCH_SIZE = 32
# Items per slide whose read steps are timed one by one for the per-tile cost breakdown.
BREAKDOWN_SAMPLE = 64
# Tiles in one pass of the long-pass rows. A pass over a small slide's kept tiles (43 on CMU) lasts
# about 40 ms with 2 processes, so the fixed cost of starting a pass outweighs the reading in it.
LONG_PASS_TILES = 640
# Seed of the random order of the shuffled long-pass rows.
SHUFFLE_SEED = 0

# The generated pyramid: level-0 size, resolution and the downsample of each level.
GENERATED_SIZE = (20000, 15000)
GENERATED_MPP = 0.25
GENERATED_DOWNSAMPLES = (1, 4, 16)
GENERATED_TILE = 256
MICRONS_PER_CENTIMETRE = 1.0e4
# Side of the tissue field in level-0 pixels per field pixel, and of the repeating stain texture.
FIELD_CELL = 16
TEXTURE_SIDE = 512

# Acceptance targets: loader tiles/s over bare-loop tiles/s, and 2-process over 1-process tiles/s.
TARGET_LOADER_RATIO = 0.9
TARGET_SPEEDUP = 1.8


@dataclass
class Measurement:
    """Times of one method. ``count`` is the number of slides or tiles that one run handles.

    ``seconds`` are wall times. ``cpu_seconds`` are the user plus system CPU time of this process
    and of the worker processes that ended during the same runs.
    """

    name: str
    unit: str
    count: int
    processes: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_cpu(self) -> float | None:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else None

    @property
    def rate(self) -> float:
        return self.count / self.median


# ---------------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 2**30, 1)
    except (OSError, ValueError):
        pass
    return None


def describe_machine() -> dict:
    """Collect the CPU, memory and library versions that the numbers depend on."""
    return {
        "cpu_model": _cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "openslide-python": openslide.__version__,
        "openslide_library": openslide.__library_version__,
        "Pillow": PIL.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "tifffile": tifffile.__version__,
        "multiprocessing_start_method": multiprocessing.get_start_method(),
        "load_average_at_start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------
# Generated pyramid


def _tissue_field(rng: np.random.Generator) -> np.ndarray:
    """Return a boolean tissue map with one value per ``FIELD_CELL`` level-0 pixels: smooth blobs, about 45 % tissue.

    The blobs fade out towards the border, so the border of the slide is background, as on a real scan.
    """
    columns = -(-GENERATED_SIZE[0] // FIELD_CELL)
    rows = -(-GENERATED_SIZE[1] // FIELD_CELL)
    noise = gaussian(rng.standard_normal((rows, columns)), sigma=40)
    y, x = np.mgrid[0:rows, 0:columns]
    distance_to_border = np.minimum.reduce([x, y, columns - 1 - x, rows - 1 - y])
    noise *= np.clip(distance_to_border / (0.08 * min(rows, columns)), 0.0, 1.0)
    return noise > np.quantile(noise, 0.55)


def _stain_textures(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return a repeating eosin-pink texture with purple nuclei and a near-white background texture."""
    side = TEXTURE_SIDE
    tissue = np.empty((side, side, 3), np.float32)
    tissue[:] = (236, 168, 200)
    tissue += rng.normal(0, 10, (side, side, 1))
    y, x = np.mgrid[0:side, 0:side]
    for _ in range(120):
        centre_x, centre_y = rng.integers(0, side, 2)
        radius = int(rng.integers(8, 16))  # 4-8 µm nuclei at 0.25 µm/px
        # Distances wrap around, so the texture repeats without seams.
        dx = (x - centre_x + side // 2) % side - side // 2
        dy = (y - centre_y + side // 2) % side - side // 2
        tissue[dx * dx + dy * dy < radius * radius] = (120, 70, 150) + rng.normal(0, 8, 3)
    background = np.repeat(245 + rng.normal(0, 2, (side, side, 1)), 3, axis=2)
    return np.clip(tissue, 0, 255).astype(np.uint8), np.clip(background, 0, 255).astype(np.uint8)


def _level_tiles(downsample: int, tissue_field: np.ndarray, textures: tuple[np.ndarray, np.ndarray]):
    """Yield the level's tiles in row-major order, each sampled from the level-0 pattern (nearest pixel)."""
    tissue, background = textures
    side = TEXTURE_SIDE
    width = -(-GENERATED_SIZE[0] // downsample)
    height = -(-GENERATED_SIZE[1] // downsample)
    field_rows, field_columns = tissue_field.shape
    for top in range(0, height, GENERATED_TILE):
        for left in range(0, width, GENERATED_TILE):
            rows0 = np.arange(top, top + GENERATED_TILE) * downsample
            columns0 = np.arange(left, left + GENERATED_TILE) * downsample
            is_tissue = tissue_field[np.minimum(rows0 // FIELD_CELL, field_rows - 1)][:, np.minimum(columns0 // FIELD_CELL, field_columns - 1)]
            texture_rows, texture_columns = (rows0 % side)[:, None], (columns0 % side)[None, :]
            yield np.where(is_tissue[..., None], tissue[texture_rows, texture_columns], background[texture_rows, texture_columns])


def write_generated_slide(path: Path) -> None:
    """Write the generated pyramid (see the module docstring) as a classic tiled TIFF."""
    rng = np.random.default_rng(0)
    tissue_field = _tissue_field(rng)
    textures = _stain_textures(rng)
    pixels_per_centimetre = MICRONS_PER_CENTIMETRE / GENERATED_MPP
    with tifffile.TiffWriter(path, bigtiff=False) as writer:
        for downsample in GENERATED_DOWNSAMPLES:
            shape = (-(-GENERATED_SIZE[1] // downsample), -(-GENERATED_SIZE[0] // downsample), 3)
            writer.write(
                _level_tiles(downsample, tissue_field, textures), shape=shape, dtype=np.uint8,
                tile=(GENERATED_TILE, GENERATED_TILE), photometric="rgb", compression="zlib",
                compressionargs={"level": 1}, maxworkers=2,
                resolution=(pixels_per_centimetre / downsample, pixels_per_centimetre / downsample),
                resolutionunit="CENTIMETER", subfiletype=0 if downsample == 1 else 1,
            )


def check_generated_slide(path: Path) -> str:
    """Raise RuntimeError unless OpenSlide reads the file as generic-tiff with the written levels and mpp."""
    slide_format = openslide.OpenSlide.detect_format(str(path))
    if slide_format != "generic-tiff":
        raise RuntimeError(f"{path}: OpenSlide detects format {slide_format!r}, expected 'generic-tiff'")
    with openslide.OpenSlide(str(path)) as slide:
        downsamples = slide.level_downsamples
        mpp_x = float(slide.properties.get("openslide.mpp-x", "nan"))
        mpp_y = float(slide.properties.get("openslide.mpp-y", "nan"))
        dimensions = slide.dimensions
    # Odd level sizes are rounded up, so a downsample may differ from the nominal one by a fraction of a pixel.
    if len(downsamples) != len(GENERATED_DOWNSAMPLES) or any(
        abs(found - expected) > 0.01 * expected for found, expected in zip(downsamples, GENERATED_DOWNSAMPLES)
    ):
        raise RuntimeError(f"{path}: OpenSlide reads downsamples {downsamples}, expected {GENERATED_DOWNSAMPLES}")
    if dimensions != GENERATED_SIZE:
        raise RuntimeError(f"{path}: OpenSlide reads level-0 size {dimensions}, expected {GENERATED_SIZE}")
    if not (abs(mpp_x - GENERATED_MPP) < 1e-6 and abs(mpp_y - GENERATED_MPP) < 1e-6):
        raise RuntimeError(f"{path}: OpenSlide reads mpp {mpp_x}, {mpp_y}, expected {GENERATED_MPP}")
    levels = ", ".join(f"{d:g}" for d in downsamples)
    return f"{slide_format}, {dimensions[0]}x{dimensions[1]}, downsamples {levels}, {mpp_x:g} µm/px"


# ---------------------------------------------------------------------------------------------
# Methods


def run_prepare(source: Path, work: Path, key_file: Path, workers: int, export: bool) -> dict:
    """Run ``prepare_wsi`` into a new folder under ``work``, delete that folder, return the manifest."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    try:
        return prepare_wsi(WsiOptions(source=source, out=out, mpp=TARGET_MPP, tile_size=TILE_SIZE, key_file=key_file,
                                      workers=workers, export_tiles=export))
    finally:
        shutil.rmtree(out)


def read_with_dataset(items: list[dict], root: Path) -> int:
    """Index the project's loader once per item in one process; return the number of tiles read."""
    dataset = WsiTileDataset(items, root)
    try:
        for index in range(len(dataset)):
            dataset[index]
    finally:
        dataset.close()
    return len(dataset)


def read_with_dataloader(items: list[dict], root: Path, num_workers: int) -> int:
    """Iterate a torch DataLoader over the project's loader; return the number of tiles read."""
    dataset = WsiTileDataset(items, root)
    loader = tile_loader(dataset, BATCH_SIZE, num_workers=num_workers)
    count = 0
    try:
        for batch in loader:
            count += len(batch["label"])
    finally:
        _shutdown_workers(loader)
        dataset.close()
    return count


def _shutdown_workers(loader: DataLoader) -> None:
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(pass number, index)`` for every item, the pass number rising by one at every pass."""

    def __init__(self, count: int):
        self.count, self.epoch = count, 0

    def __iter__(self):
        self.epoch += 1
        return iter([(self.epoch, index) for index in range(self.count)])

    def __len__(self) -> int:
        return self.count


class _FreshHandlesEachPass(torch.utils.data.Dataset):
    """The project's loader, with its slide handles closed whenever a new pass begins in this process."""

    def __init__(self, items: list[dict], root: Path):
        self.dataset, self.epoch = WsiTileDataset(items, root), None

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if epoch != self.epoch:
            self.dataset.close()
            self.epoch = epoch
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class PersistentLoader:
    """A DataLoader over the project's loader whose 2 worker processes live across passes.

    This is how training reads tiles (``cls_engine`` keeps one DataLoader with
    ``persistent_workers=True`` for all rounds): the workers start once, in the warm-up pass. So
    that every pass starts with an empty OpenSlide cache, as in the other rows, the workers reopen
    their slides at the start of each pass.
    """

    def __init__(self, items: list[dict], root: Path, num_workers: int):
        self.dataset = _FreshHandlesEachPass(items, root)
        self.loader = tile_loader(self.dataset, BATCH_SIZE, num_workers=num_workers,
                                  sampler=_EpochSampler(len(items)))

    def __call__(self) -> int:
        return sum(len(batch["label"]) for batch in self.loader)

    def close(self) -> None:
        _shutdown_workers(self.loader)
        self.dataset.dataset.close()


_pool_pass: list[int] = [0]  # the pass a persistent Pool worker last read in


def _bare_chunk_of_pass(arguments: tuple[int, list[dict], Path]) -> int:
    epoch, items, root = arguments
    if epoch != _pool_pass[0]:  # a new pass: start with fresh handles, as the 1-process loop does
        _close_bare_handles()
        _pool_pass[0] = epoch
    return _bare_loop(items, root)


class PersistentPool:
    """The bare loop in a ``multiprocessing.Pool`` started once and reused by every pass."""

    def __init__(self, items: list[dict], root: Path, processes: int):
        _close_bare_handles()  # a forked worker must not inherit an open handle
        self.chunks = [(items[start:start + BATCH_SIZE], root) for start in range(0, len(items), BATCH_SIZE)]
        self.pool = multiprocessing.Pool(processes)
        self.epoch = 0

    def __call__(self) -> int:
        self.epoch += 1
        return sum(self.pool.imap_unordered(_bare_chunk_of_pass, [(self.epoch, *chunk) for chunk in self.chunks]))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


# Slide handles of the bare loop in the current process, by absolute path.
_bare_handles: dict[str, openslide.OpenSlide] = {}


def _bare_loop(items: list[dict], root: Path) -> int:
    """Read the items' regions with OpenSlide and convert them to RGB; keep one handle per slide."""
    for item in items:
        path = str(root / item["image"])
        slide = _bare_handles.get(path)
        if slide is None:
            slide = _bare_handles[path] = openslide.OpenSlide(path)
        slide.read_region(tuple(item["location"]), item["level"], tuple(item["size"])).convert("RGB")
    return len(items)


def _close_bare_handles() -> None:
    for slide in _bare_handles.values():
        slide.close()
    _bare_handles.clear()


def read_bare(items: list[dict], root: Path) -> int:
    """Run the bare OpenSlide loop in this process with fresh handles; return the number of tiles read."""
    _close_bare_handles()
    try:
        return _bare_loop(items, root)
    finally:
        _close_bare_handles()


def _bare_chunk(arguments: tuple[list[dict], Path]) -> int:
    return _bare_loop(*arguments)


def read_bare_pool(items: list[dict], root: Path, processes: int) -> int:
    """Run the bare loop in a process pool, over chunks of ``BATCH_SIZE`` items as a DataLoader hands out.

    The pool is started and stopped inside the call, as a DataLoader starts its workers for each
    pass. Workers return only a count, while DataLoader workers also send the tile pixels back.
    """
    _close_bare_handles()  # a forked worker must not inherit an open handle
    chunks = [(items[start:start + BATCH_SIZE], root) for start in range(0, len(items), BATCH_SIZE)]
    with multiprocessing.Pool(processes) as pool:
        return sum(pool.imap_unordered(_bare_chunk, chunks))


# ---------------------------------------------------------------------------------------------
# Timing


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_interleaved(measurements: list[tuple[Measurement, Callable[[], int]]], repeats: int,
                        warm_up: bool = True) -> None:
    """Run every method once as a warm-up (unless ``warm_up`` is false), then ``repeats`` rounds of all methods in turn.

    Interleaving keeps slow drifts of the machine (other load, CPU frequency) from favouring one method.
    Raises RuntimeError when a method handles another number of items than its measurement expects.
    """
    for round_index in range(repeats + 1 if warm_up else repeats):
        for measurement, method in measurements:
            cpu_start = _cpu_seconds()
            start = time.perf_counter()
            handled = method()
            elapsed = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu_start
            if handled != measurement.count:
                raise RuntimeError(f"{measurement.name}: handled {handled} items, expected {measurement.count}")
            if round_index > 0 or not warm_up:
                measurement.seconds.append(elapsed)
                measurement.cpu_seconds.append(cpu)


def per_tile_costs(items: list[dict], root: Path) -> dict[str, float]:
    """Time each step of one tile read on up to ``BREAKDOWN_SAMPLE`` items spread over the slide, in ms per tile.

    Each reading step runs on its own fresh handle in datalist order over the sample only, so fewer
    neighbouring tiles share OpenSlide's cache than in the full loops.
    """
    sample = items[:: max(1, len(items) // BREAKDOWN_SAMPLE)][:BREAKDOWN_SAMPLE]
    costs: dict[str, float] = {}

    def timed(label: str, step: Callable, inputs: list) -> list:
        start = time.perf_counter()
        outputs = [step(value) for value in inputs]
        costs[label] = (time.perf_counter() - start) * 1e3 / len(inputs)
        return outputs

    path = str(root / sample[0]["image"])
    with openslide.OpenSlide(path) as slide:
        regions = timed("bare: read_region (RGBA image)", lambda item: slide.read_region(
            tuple(item["location"]), item["level"], tuple(item["size"])), sample)
    timed("bare: .convert('RGB')", lambda region: region.convert("RGB"), regions)
    tile_size = sample[0]["tile_size"]
    with openslide.OpenSlide(path) as slide:
        timed("loader: read_tile, (3, H, W) uint8", lambda item: read_tile(
            slide, tuple(item["location"]), item["level"], tuple(item["size"]), tile_size, channels_first=True), sample)
    if regions[0].size != (tile_size, tile_size):
        # The loader's own choice of method: Pillow's reduce for whole factors, else torch's bilinear kernel.
        bands = [np.ascontiguousarray(np.asarray(region.convert("RGB")).transpose(2, 0, 1)) for region in regions]
        timed(f"of which: resize to {tile_size}", lambda band: resize_bands(band, tile_size, True), bands)
    # A DataLoader worker stacks each batch into a new shared-memory block that the main process then
    # maps, which a 1-process loop never does. Timed per tile of a full batch; each block is freed
    # before the next, as the main process frees a batch once it is used.
    tiles = [torch.zeros((3, tile_size, tile_size), dtype=torch.uint8) for _ in range(BATCH_SIZE)]
    numel = BATCH_SIZE * tiles[0].numel()

    def shared_batch(fill: bool) -> int:
        out = tiles[0].new(tiles[0]._typed_storage()._new_shared(numel, device=tiles[0].device))
        if fill:
            torch.stack(tiles, 0, out=out.resize_(BATCH_SIZE, *tiles[0].shape))
        return out.numel()

    for label, fill in ((f"DataLoader worker: allocate a shared batch of {BATCH_SIZE}", False),
                        (f"DataLoader worker: allocate and fill a shared batch of {BATCH_SIZE}", True)):
        timed(label, lambda _: shared_batch(fill), list(range(BREAKDOWN_SAMPLE)))
        costs[label] /= BATCH_SIZE
    # What tile_loader's workers do instead (fedimaging_app.batch_slots): fill a shared batch
    # allocated and filled once before, whose pages are already in place.
    slot = tiles[0].new(tiles[0]._typed_storage()._new_shared(numel, device=tiles[0].device)).resize_(
        BATCH_SIZE, *tiles[0].shape)
    torch.stack(tiles, 0, out=slot)
    label = f"tile_loader worker: fill a reused shared batch of {BATCH_SIZE}"
    timed(label, lambda _: torch.stack(tiles, 0, out=slot).numel(), list(range(BREAKDOWN_SAMPLE)))
    costs[label] /= BATCH_SIZE
    return costs


def _read_items(out: Path) -> list[dict]:
    datalist = json.loads((out / DATALIST_NAME).read_text())
    return datalist["training"] + datalist["validation"]


def repeated_items(items: list[dict], root: Path, minimum: int) -> list[dict]:
    """Repeat ``items`` until there are at least ``minimum``, each copy reading the slide through its own link.

    Every copy names a new symbolic link to the slide file in ``root/slides``. The loader and the bare
    loop therefore open one handle per copy, and each copy starts with an empty OpenSlide cache, as a
    pass over that many different slides would. Calls with the same items reuse the same links.
    """
    if not items:
        return items
    copies = -(-minimum // len(items))
    if copies <= 1:
        return items
    repeated = []
    for copy in range(copies):
        links = {}
        for item in items:
            image = item["image"]
            if image not in links:
                original = root / image
                link = original.with_name(f"{original.stem}-copy{copy}{original.suffix}")
                if not link.exists():
                    link.symlink_to(original.resolve())
                links[image] = str(link.relative_to(root))
            repeated.append({**item, "image": links[image]})
    return repeated


def long_pass_layouts(items: list[dict], root: Path) -> dict[str, list[dict]]:
    """The long passes of a slide with fewer than ``LONG_PASS_TILES`` kept tiles, by label; empty otherwise.

    * ``long pass (C copies of N)``: all N kept tiles per copy. When N is not a whole number of
      batches, a copy's tiles fall into batches that go to both workers. With 2 processes each
      copy's slide is then opened, and its first JPEG tiles decoded, by both, while 1 process pays
      this per-slide cost once. On small slides it is a large part of a copy's time (about 4.7 ms to open
      the CMU slide, against 43 tiles of about 1.2 ms).
    * ``long pass, whole batches (C copies of N)``: each copy contains the first ``BATCH_SIZE * k``
      tiles, so every batch reads one copy and 1 and 2 processes open the same number of slides, as
      on slides with hundreds of tiles. Skipped when the slide has fewer than ``BATCH_SIZE`` tiles.
    """
    if len(items) >= LONG_PASS_TILES:
        return {}
    layouts = {}
    everything = repeated_items(items, root, LONG_PASS_TILES)
    layouts[f"long pass ({len(everything) // len(items)} copies of {len(items)})"] = everything
    whole = items[:len(items) // BATCH_SIZE * BATCH_SIZE]
    if whole and len(whole) < len(items):
        aligned = repeated_items(whole, root, LONG_PASS_TILES)
        layouts[f"long pass, whole batches ({len(aligned) // len(whole)} copies of {len(whole)})"] = aligned
    return layouts


def measure_long_pass(label: str, long_items: list[dict], root: Path, repeats: int,
                      shuffled: bool = False) -> list[Measurement]:
    """Time the 1- and 2-process loader and bare loop on one long pass; names start with ``label``.

    With ``shuffled``, also the 1-process loader and bare loop over the same items in one random
    order, the order in which training draws tiles from all slides at once.
    """
    tiles = len(long_items)
    loader = Measurement(f"{label}: loader, 1 process", "tiles/s", tiles, 1)
    bare = Measurement(f"{label}: bare loop, 1 process", "tiles/s", tiles, 1)
    loader_persistent = Measurement(f"{label}: loader, 2 persistent", "tiles/s", tiles, 2)
    bare_persistent = Measurement(f"{label}: bare, persistent Pool(2)", "tiles/s", tiles, 2)
    persistent_pool = PersistentPool(long_items, root, 2)
    persistent_loader = PersistentLoader(long_items, root, 2)
    methods = [
        (loader, lambda: read_with_dataset(long_items, root)),
        (bare, lambda: read_bare(long_items, root)),
        (loader_persistent, persistent_loader),
        (bare_persistent, persistent_pool),
    ]
    if shuffled:
        order = list(long_items)
        random.Random(SHUFFLE_SEED).shuffle(order)
        methods += [
            (Measurement(f"{label}: loader, 1 process, shuffled", "tiles/s", tiles, 1),
             lambda: read_with_dataset(order, root)),
            (Measurement(f"{label}: bare loop, 1 process, shuffled", "tiles/s", tiles, 1),
             lambda: read_bare(order, root)),
        ]
    try:
        measure_interleaved(methods, repeats)
    finally:
        persistent_loader.close()
        persistent_pool.close()
    return [measurement for measurement, _ in methods]


def long_pass_ratios(measurements: list[Measurement]) -> dict[str, float]:
    """Compute the loader/bare ratios and the 2-process speedups of each long pass, by layout.

    The keys name the layout without its copy counts: ``long pass`` or ``long pass, whole batches``.
    """
    layouts: dict[str, dict[str, Measurement]] = {}
    for measurement in measurements:
        prefix, method = measurement.name.split(": ", 1)
        layouts.setdefault(prefix.split(" (")[0], {})[method] = measurement
    values = {}
    for layout, rows in layouts.items():
        loader, bare = rows["loader, 1 process"], rows["bare loop, 1 process"]
        loader_persistent, bare_persistent = rows["loader, 2 persistent"], rows["bare, persistent Pool(2)"]
        values.update({
            f"{layout}: loader / bare, 1 process": loader.rate / bare.rate,
            f"{layout}: loader speedup, 2 persistent processes / 1": loader_persistent.rate / loader.rate,
            f"{layout}: bare speedup, 2 persistent processes / 1": bare_persistent.rate / bare.rate,
            f"{layout}: loader / bare, 2 persistent processes": loader_persistent.rate / bare_persistent.rate,
        })
        if "loader, 1 process, shuffled" in rows:
            values[f"{layout}: loader / bare, 1 process, shuffled"] = (
                rows["loader, 1 process, shuffled"].rate / rows["bare loop, 1 process, shuffled"].rate)
    return values


def benchmark_slide(name: str, path: Path, work: Path, key_file: Path, repeats: int) -> tuple[list[Measurement], dict]:
    """Measure tiling, export and tile reading on one slide; return the measurements and the slide facts."""
    reference_out = work / f"reference-{name}"
    manifest = prepare_wsi(WsiOptions(source=path, out=reference_out, mpp=TARGET_MPP, tile_size=TILE_SIZE,
                                      key_file=key_file))
    if not manifest["slides"]:
        raise RuntimeError(f"{path}: prepare_wsi produced no tiles: {manifest['rejected']}")
    slide_facts = manifest["slides"][0]
    items = _read_items(reference_out)
    tiles = len(items)
    facts = {
        "slide": name, "path": str(path), "vendor": slide_facts["vendor"], "level0_size": slide_facts["level0_size"],
        "mpp_level0": slide_facts["mpp_level0"], "level": slide_facts["level"], "resampled": slide_facts["resampled"],
        "read_size": items[0]["size"], "tile_size": items[0]["tile_size"], "tiles_total": slide_facts["tiles_total"],
        "tiles_kept": tiles, "tissue_mode": slide_facts["tissue_mode"],
    }

    tiling = Measurement("tiling, coordinates only (prepare_wsi)", "slides/s", 1, 1)
    export = Measurement("tiling + --export-tiles (prepare_wsi)", "tiles/s", tiles, 1)
    measure_interleaved([
        (tiling, lambda: len(run_prepare(path, work, key_file, 1, False)["slides"])),
        (export, lambda: run_prepare(path, work, key_file, 1, True)["summary"]["tiles"]),
    ], repeats)
    export_only = Measurement("export alone (difference of the medians)", "tiles/s", tiles, 1,
                              [export.median - tiling.median])

    loader = Measurement("loader: WsiTileDataset[i]", "tiles/s", tiles, 1)
    loader_batches = Measurement(f"loader: DataLoader num_workers=0, batch {BATCH_SIZE}", "tiles/s", tiles, 1)
    loader_workers = Measurement(f"loader: DataLoader num_workers=2, batch {BATCH_SIZE}", "tiles/s", tiles, 2)
    bare = Measurement("bare: read_region + convert('RGB')", "tiles/s", tiles, 1)
    bare_pool = Measurement(f"bare: same loop in Pool(2), chunks of {BATCH_SIZE}", "tiles/s", tiles, 2)
    loader_persistent = Measurement("loader: DataLoader num_workers=2, persistent", "tiles/s", tiles, 2)
    bare_persistent = Measurement("bare: same loop in a persistent Pool(2)", "tiles/s", tiles, 2)
    persistent_pool = PersistentPool(items, reference_out, 2)
    persistent_loader = PersistentLoader(items, reference_out, 2)
    try:
        measure_interleaved([
            (loader, lambda: read_with_dataset(items, reference_out)),
            (bare, lambda: read_bare(items, reference_out)),
            (loader_batches, lambda: read_with_dataloader(items, reference_out, 0)),
            (loader_workers, lambda: read_with_dataloader(items, reference_out, 2)),
            (bare_pool, lambda: read_bare_pool(items, reference_out, 2)),
            (loader_persistent, persistent_loader),
            (bare_persistent, persistent_pool),
        ], repeats)
    finally:
        persistent_loader.close()
        persistent_pool.close()
    long_pass = [measurement for label, layout in long_pass_layouts(items, reference_out).items()
                 for measurement in measure_long_pass(label, layout, reference_out, repeats,
                                                      shuffled=label.startswith("long pass, whole batches"))]
    facts["per_tile_ms"] = per_tile_costs(items, reference_out)
    shutil.rmtree(reference_out)
    return [tiling, export, export_only, loader, loader_batches, loader_workers, loader_persistent, bare, bare_pool,
            bare_persistent, *long_pass], facts


def benchmark_folder(slides: dict[str, Path], work: Path, key_file: Path, repeats: int) -> list[Measurement]:
    """Measure ``prepare_wsi`` on a folder of all slides (symbolic links) with 1 and 2 workers.

    There is no warm-up round: the per-slide measurements have already read every file and run
    every code path, and skipping it keeps the whole benchmark within about 5 minutes on 2 cores.
    """
    folder = work / "all-slides"
    folder.mkdir()
    for path in slides.values():
        (folder / path.name).symlink_to(path)
    manifest = run_prepare(folder, work, key_file, 1, False)
    if manifest["summary"]["slides"] != len(slides):
        raise RuntimeError(f"{folder}: prepare_wsi kept {manifest['summary']['slides']} of {len(slides)} slides")
    tiles = manifest["summary"]["tiles"]
    measurements = []
    for workers in (1, 2):
        tiling = Measurement(f"tiling, coordinates only, --workers {workers}", "slides/s", len(slides), workers)
        export = Measurement(f"tiling + --export-tiles, --workers {workers}", "tiles/s", tiles, workers)
        measurements.append((tiling, lambda w=workers: run_prepare(folder, work, key_file, w, False)["summary"]["slides"]))
        measurements.append((export, lambda w=workers: run_prepare(folder, work, key_file, w, True)["summary"]["tiles"]))
    measure_interleaved(measurements, repeats, warm_up=False)
    return [measurement for measurement, _ in measurements]


# ---------------------------------------------------------------------------------------------
# Report


def _find(measurements: list[Measurement], prefix: str) -> Measurement:
    return next(m for m in measurements if m.name.startswith(prefix))


def ratios(measurements: list[Measurement]) -> dict[str, float]:
    """Compute the loader/bare ratios per process count and the 2-process speedups.

    The CPU-time ratio divides the bare loop's CPU seconds by the loader's in one process. It is
    less sensitive than wall time to other programs that share the cores.
    """
    loader_1 = _find(measurements, "loader: WsiTileDataset")
    loader_2 = _find(measurements, "loader: DataLoader num_workers=2, batch")
    bare_1 = _find(measurements, "bare: read_region")
    bare_2 = _find(measurements, "bare: same loop in Pool(2)")
    loader_p = _find(measurements, "loader: DataLoader num_workers=2, persistent")
    bare_p = _find(measurements, "bare: same loop in a persistent Pool(2)")
    return {
        "loader / bare, 1 process": loader_1.rate / bare_1.rate,
        "loader / bare, 1 process, by CPU time": bare_1.median_cpu / loader_1.median_cpu,
        "loader / bare, 2 processes": loader_2.rate / bare_2.rate,
        "loader speedup, 2 processes / 1": loader_2.rate / loader_1.rate,
        "bare speedup, 2 processes / 1": bare_2.rate / bare_1.rate,
        "loader / bare, 2 persistent processes": loader_p.rate / bare_p.rate,
        "loader speedup, 2 persistent processes / 1": loader_p.rate / loader_1.rate,
        "bare speedup, 2 persistent processes / 1": bare_p.rate / bare_1.rate,
        **long_pass_ratios([m for m in measurements if m.name.startswith("long pass")]),
    }


def format_table(title: str, measurements: list[Measurement]) -> str:
    lines = [title, f"  {'measurement':<50} {'proc':>4} {'items':>6} {'median s':>9} {'cpu s':>7} {'rate':>9}  unit"]
    for m in measurements:
        cpu = f"{m.median_cpu:>7.2f}" if m.median_cpu is not None else f"{'-':>7}"
        lines.append(f"  {m.name:<50} {m.processes:>4} {m.count:>6} {m.median:>9.3f} {cpu} {m.rate:>9.1f}  {m.unit}")
    return "\n".join(lines)


def format_ratios(values: dict[str, float]) -> str:
    targets = {
        "loader / bare, 1 process": TARGET_LOADER_RATIO,
        "loader / bare, 1 process, by CPU time": TARGET_LOADER_RATIO,
        "loader / bare, 2 processes": TARGET_LOADER_RATIO,
        "loader speedup, 2 processes / 1": TARGET_SPEEDUP,
        "loader speedup, 2 persistent processes / 1": TARGET_SPEEDUP,
        "long pass: loader / bare, 1 process": TARGET_LOADER_RATIO,
        "long pass: loader speedup, 2 persistent processes / 1": TARGET_SPEEDUP,
        "long pass, whole batches: loader / bare, 1 process": TARGET_LOADER_RATIO,
        "long pass, whole batches: loader speedup, 2 persistent processes / 1": TARGET_SPEEDUP,
        "long pass, whole batches: loader / bare, 1 process, shuffled": TARGET_LOADER_RATIO,
    }
    lines = []
    for label, value in values.items():
        target = targets.get(label)
        verdict = "" if target is None else f"  (target >= {target:g}: {'met' if value >= target else 'NOT met'})"
        lines.append(f"  {label:<50} {value:>6.2f}{verdict}")
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method after one warm-up run (default 3)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the machine facts and every timing as JSON")
    parser.add_argument("--cmu", type=Path, default=CMU_SLIDE, help=f"Aperio slide (default {CMU_SLIDE})")
    parser.add_argument("--ndpi", type=Path, default=NDPI_SLIDE, help=f"Hamamatsu slide (default {NDPI_SLIDE})")
    arguments = parser.parse_args(argv)
    if arguments.repeats < 1:
        parser.error(f"--repeats {arguments.repeats}: must be at least 1")
    for option, path in (("--cmu", arguments.cmu), ("--ndpi", arguments.ndpi)):
        if not path.is_file():
            parser.error(f"{option} {path}: file not found; pass the path of the sample slide")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()

    machine = describe_machine()
    print("machine:")
    for key, value in machine.items():
        print(f"  {key}: {value}")
    print(f"settings: --mpp {TARGET_MPP} --tile-size {TILE_SIZE}, {arguments.repeats} timed runs after 1 warm-up, "
          "median reported")

    results: dict = {"machine": machine, "repeats": arguments.repeats, "slides": [], "folder": []}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-wsi-") as temporary:
        work = Path(temporary)
        key_file = work / "pseudonym.key"
        generated = work / "generated.tif"
        start = time.perf_counter()
        write_generated_slide(generated)
        description = check_generated_slide(generated)
        print(f"generated slide: {description}, {generated.stat().st_size / 1e6:.0f} MB, "
              f"written in {time.perf_counter() - start:.1f} s")
        slides = {"cmu": arguments.cmu.resolve(), "ndpi": arguments.ndpi.resolve(), "generated": generated}

        all_ratios = {}
        for name, path in slides.items():
            measurements, facts = benchmark_slide(name, path, work, key_file, arguments.repeats)
            slide_ratios = ratios(measurements)
            all_ratios[name] = slide_ratios
            print()
            print(f"{name}: {facts['vendor']}, level-0 {facts['level0_size'][0]}x{facts['level0_size'][1]} at "
                  f"{facts['mpp_level0'][0]:.4g} µm/px; read at level {facts['level']} as "
                  f"{facts['read_size'][0]}x{facts['read_size'][1]} regions"
                  + (f", resized to {facts['tile_size']}x{facts['tile_size']} by the loader only" if facts["resampled"] else "")
                  + f"; {facts['tiles_kept']} of {facts['tiles_total']} tiles kept ({facts['tissue_mode']})")
            print(format_table(f"{name}:", measurements))
            print(format_ratios(slide_ratios))
            print(f"  per-tile cost of each read step, ms (first read of {min(BREAKDOWN_SAMPLE, facts['tiles_kept'])} "
                  "tiles spread over the slide): "
                  + ", ".join(f"{label} {value:.2f}" for label, value in facts["per_tile_ms"].items()))
            results["slides"].append({**facts, "measurements": [vars(m) for m in measurements], "ratios": slide_ratios})

        folder_measurements = benchmark_folder(slides, work, key_file, arguments.repeats)
        print()
        print(format_table("folder of all three slides (prepare_wsi parallelises over slides):", folder_measurements))
        speedup_tiling = folder_measurements[2].rate / folder_measurements[0].rate
        speedup_export = folder_measurements[3].rate / folder_measurements[1].rate
        print(f"  {'tiling speedup, --workers 2 / 1':<50} {speedup_tiling:>6.2f}")
        print(f"  {'export speedup, --workers 2 / 1':<50} {speedup_export:>6.2f}")
        results["folder"] = {"measurements": [vars(m) for m in folder_measurements],
                             "speedup_tiling": speedup_tiling, "speedup_export": speedup_export}

    total = time.perf_counter() - started
    load_at_end = " ".join(f"{load:.2f}" for load in os.getloadavg())
    print(f"\ntotal run time: {total:.0f} s; load average at start {machine['load_average_at_start']}, at end {load_at_end}")
    results["total_seconds"] = total
    results["load_average_at_end"] = load_at_end
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {arguments.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
