"""The batching of the tile loader that training and validation use (``fedimaging_app.tiles.tile_loader``)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, Dataset, SequentialSampler

from fedimaging_app.tiles import WorkerBalancedBatchSampler, WsiTileDataset, tile_loader


def worker_loads(batches: list[list[int]], workers: int) -> list[int]:
    """Count the items each worker reads when a DataLoader hands the batches out in turn."""
    loads = [0] * workers
    for number, batch in enumerate(batches):
        loads[number % workers] += len(batch)
    return loads


@pytest.mark.parametrize("count", [0, 1, 3, 31, 32, 33, 43, 64, 67, 96, 97, 671, 1000])
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_balanced_batches_cover_items_once(count, workers):
    batches = list(WorkerBalancedBatchSampler(SequentialSampler(range(count)), 32, workers))
    assert [index for batch in batches for index in batch] == list(range(count))
    assert all(1 <= len(batch) <= 32 for batch in batches)
    assert len(batches) == len(WorkerBalancedBatchSampler(SequentialSampler(range(count)), 32, workers))
    loads = worker_loads(batches, workers)
    assert max(loads) - min(loads) <= 1, loads
    # Only the batches of the last turn may be short.
    assert all(len(batch) == 32 for batch in batches[:max(0, len(batches) - workers)])


def test_plain_batching_is_unbalanced():
    # The reason for the sampler: with plain batches one worker reads 32 of 43 tiles.
    plain = list(BatchSampler(SequentialSampler(range(43)), 32, drop_last=False))
    assert worker_loads(plain, 2) == [32, 11]
    balanced = list(WorkerBalancedBatchSampler(SequentialSampler(range(43)), 32, 2))
    assert worker_loads(balanced, 2) == [22, 21]


@pytest.mark.parametrize("workers", [0, 1])
def test_one_process_matches_batch_sampler(workers):
    for count in (0, 5, 32, 70):
        expected = list(BatchSampler(SequentialSampler(range(count)), 32, drop_last=False))
        assert list(WorkerBalancedBatchSampler(SequentialSampler(range(count)), 32, workers)) == expected


def test_rejects_batch_size_zero():
    with pytest.raises(ValueError, match="batch_size"):
        WorkerBalancedBatchSampler(SequentialSampler(range(3)), 0, 2)


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 45

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((3, 2, 2), index, dtype=torch.uint8), "label": index}


def test_two_workers_return_every_item():
    loader = tile_loader(_Numbers(), 16, num_workers=2)
    try:
        for _ in range(2):  # The second pass reuses the persistent workers.
            labels = torch.cat([batch["label"] for batch in loader]).tolist()
            assert labels == list(range(45))
        assert loader.persistent_workers
    finally:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()


def test_seeded_shuffle_is_reproducible():
    first = tile_loader(_Numbers(), 16, shuffle=True, generator=torch.Generator().manual_seed(3))
    second = tile_loader(_Numbers(), 16, shuffle=True, generator=torch.Generator().manual_seed(3))
    order = torch.cat([batch["label"] for batch in first]).tolist()
    assert order == torch.cat([batch["label"] for batch in second]).tolist()
    assert sorted(order) == list(range(45))
    assert order != list(range(45))


@pytest.mark.parametrize("image_size", [None, 64, 224])
def test_batch_normalisation_matches_per_tile(image_size):
    from fedimaging_app.cls_engine import normalise_batch

    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (3, 3, 150, 150), dtype=torch.uint8, generator=generator)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = []
    for tile in tiles:  # one tile at a time, as a worker process would
        image = tile.float() / 255.0
        if image_size and image.shape[-1] != image_size:
            image = torch.nn.functional.interpolate(image[None], size=(image_size, image_size), mode="bilinear",
                                                    align_corners=False)[0]
        expected.append((image - mean) / std)
    batch = normalise_batch(tiles, image_size, torch.device("cpu"))
    assert batch.dtype == torch.float32
    assert batch.shape == (3, 3, image_size or 150, image_size or 150)
    assert torch.allclose(batch, torch.stack(expected), atol=1e-6)


# --------------------------------------------------------------------------- open slides of the loader
@pytest.fixture(scope="module")
def three_slides(tmp_path_factory):
    """The CMU tiles prepared once, and the same items through 3 links that open as 3 different slides."""
    from preprocessing.prepare_wsi import WsiOptions, prepare_wsi
    from tests.conftest import DATA, require

    root = tmp_path_factory.mktemp("cmu")
    out = root / "prepared"
    prepare_wsi(WsiOptions(source=require(DATA / "pathology" / "slides" / "cmu_small_region.svs"), out=out,
                           mpp=0.5, tile_size=224, key_file=root / "site.key"))
    datalist = json.loads((out / "datalist.json").read_text())
    items = (datalist["training"] + datalist["validation"])[:4]
    original = out / items[0]["image"]
    slides = {}
    for name in "abc":
        link = original.with_name(f"{name}{original.suffix}")
        link.symlink_to(original.resolve())
        slides[name] = [{**item, "image": str(link.relative_to(out))} for item in items]
    return out, slides


def test_least_recent_slide_closed_first(three_slides):
    out, slides = three_slides
    dataset = WsiTileDataset(slides["a"] + slides["b"] + slides["c"], out, max_open_slides=2)
    try:
        reference = WsiTileDataset(slides["a"], out)[1]["image"]
        order = [0, 4, 1, 8]  # slide a, b, a again, then c: b is the least recently read
        images = [dataset[index]["image"] for index in order]
        assert list(dataset._slides) == [slides["a"][0]["image"], slides["c"][0]["image"]]
        assert np.array_equal(images[2], reference)
    finally:
        dataset.close()


def test_open_slides_share_one_cache(three_slides, monkeypatch):
    import openslide

    out, slides = three_slides
    caches = []
    original = openslide.OpenSlide.set_cache
    monkeypatch.setattr(openslide.OpenSlide, "set_cache", lambda slide, cache: (caches.append(cache),
                                                                                  original(slide, cache)))
    dataset = WsiTileDataset(slides["a"] + slides["b"] + slides["c"], out)
    try:
        first = [dataset[index]["image"] for index in (0, 4, 8)]
        assert len(caches) == 3
        assert caches[0] is caches[1] is caches[2]
        # A copy sent to a spawned worker carries no open slide or cache, and reads the same pixels.
        copy = pickle.loads(pickle.dumps(dataset))
        assert copy._slides == {}
        assert copy._cache is None
        assert all(np.array_equal(copy[index]["image"], image) for index, image in zip((0, 4, 8), first))
        copy.close()
    finally:
        dataset.close()


@pytest.mark.parametrize(("limit", "expected"), [(20, 16), (256, 64), (1024, 128), (1 << 20, 128)])
def test_open_slides_follow_file_limit(monkeypatch, limit, expected):
    import resource

    from fedimaging_app.tiles import default_max_open_slides

    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, limit))
    assert default_max_open_slides() == expected
