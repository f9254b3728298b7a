"""Worker batches written into reused shared memory (``fedimaging_app.batch_slots``), as ``tile_loader`` builds them.

Real torch DataLoader worker processes read a made-up dataset. Each tensor contains its item's number,
so a batch overwritten by a later one would show.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler

from fedimaging_app.batch_slots import SlotLoader, slot_of
from fedimaging_app.tiles import WorkerBalancedBatchSampler, tile_loader

BATCH = 16
ITEMS = 100


class _Tiles(Dataset):
    """Tile-like items: a (3, 96, 96) uint8 array filled with the item's number, and a label."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, index: int) -> dict:
        return {"image": np.full((3, 96, 96), index % 251, dtype=np.uint8), "label": index, "name": f"tile-{index}"}


def _check(batch: dict, expected_indices: list[int]) -> None:
    assert batch["label"].tolist() == expected_indices
    assert batch["name"] == [f"tile-{i}" for i in expected_indices]
    values = torch.tensor([i % 251 for i in expected_indices], dtype=torch.uint8)
    assert batch["image"].shape == (len(expected_indices), 3, 96, 96)
    assert torch.equal(batch["image"], values[:, None, None, None].expand(-1, 3, 96, 96))


def _close(loader) -> None:
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()


@pytest.fixture
def loader():
    built = tile_loader(_Tiles(), BATCH, num_workers=2)
    yield built
    _close(built)


def _expected_batches() -> list[list[int]]:
    return list(WorkerBalancedBatchSampler(SequentialSampler(range(ITEMS)), BATCH, 2))


def test_slots_only_with_workers():
    assert isinstance(tile_loader(_Tiles(), BATCH, num_workers=2), SlotLoader)
    assert not isinstance(tile_loader(_Tiles(), BATCH, num_workers=0), SlotLoader)
    with pytest.raises(ValueError, match="persistent workers"):
        SlotLoader(_Tiles(), batch_sampler=[[0]], batch_size=1, num_workers=2, persistent_workers=False)


def test_slots_reused_batches_unchanged(loader):
    expected = _expected_batches()
    images, labels = [], []
    for _ in range(4):  # persistent workers: the slots carry over from pass to pass
        batches = 0
        for batch, indices in zip(loader, expected, strict=True):
            _check(batch, indices)
            images.append(slot_of(batch["image"]))
            labels.append(slot_of(batch["label"]))
            batches += 1
        assert batches == len(expected)
    # 4 passes of 8 batches came from at most 2 workers x 4 slots for the images and as many for the
    # labels, where a plain DataLoader makes new shared memory for every tensor of every batch.
    assert len(images) == 4 * len(expected)
    assert None not in images
    assert None not in labels
    assert len(set(images)) <= 2 * loader.slots.slots_per_worker
    assert len(set(labels)) <= 2 * loader.slots.slots_per_worker
    assert not set(images) & set(labels)


def test_kept_batches_never_overwritten(loader):
    expected = _expected_batches()
    kept = list(loader)  # every batch of the first pass stays referenced
    view = None
    for number, batch in enumerate(loader):
        if number == 2:
            view = batch["image"][5]  # only a view of one tile outlives its batch
            view_index = expected[2][5]
    for _ in range(2):
        for batch, indices in zip(loader, expected, strict=True):
            _check(batch, indices)
    for batch, indices in zip(kept, expected, strict=True):
        _check(batch, indices)
    assert torch.equal(view, torch.full((3, 96, 96), view_index % 251, dtype=torch.uint8))


def test_abandoned_pass_releases_slots(loader):
    expected = _expected_batches()
    abandoned = []
    for _ in range(6):  # stop early, as training does after steps_per_round batches
        for number, batch in enumerate(loader):
            _check(batch, expected[number])
            abandoned.append(slot_of(batch["image"]))
            if number == 1:
                break
    full = []
    for batch, indices in zip(loader, expected, strict=True):
        _check(batch, indices)
        full.append(slot_of(batch["image"]))
    # The batches the workers had read ahead are dropped when the next pass starts, and their slots
    # come back. Were they lost, every slot would be taken after two abandoned passes, and each of
    # the 20 batches seen from then on would come in new shared memory. A worker that needs a slot
    # before the release reaches it uses new memory once, hence the margin over the 8 slots.
    seen = [key for key in abandoned + full if key is not None]
    assert len(seen) >= len(abandoned + full) - 4
    assert len(set(seen)) <= 2 * loader.slots.slots_per_worker


def test_spawned_workers_read_correctly():
    spawned = SlotLoader(_Tiles(), batch_sampler=WorkerBalancedBatchSampler(SequentialSampler(range(ITEMS)), BATCH, 2),
                         batch_size=BATCH, num_workers=2, persistent_workers=True, multiprocessing_context="spawn")
    try:
        for _ in range(2):
            for batch, indices in zip(spawned, _expected_batches(), strict=True):
                _check(batch, indices)
    finally:
        _close(spawned)


def test_short_shared_memory_skips_slots(monkeypatch):
    # As in a container with a small /dev/shm: the workers stack every batch into new shared memory,
    # as a plain DataLoader does. The forked workers inherit the patched check.
    monkeypatch.setattr("fedimaging_app.batch_slots._room_for", lambda nbytes: False)
    plain = tile_loader(_Tiles(), BATCH, num_workers=2)
    try:
        for _ in range(2):
            for batch, indices in zip(plain, _expected_batches(), strict=True):
                _check(batch, indices)
                assert slot_of(batch["image"]) is None
                assert slot_of(batch["label"]) is None
    finally:
        _close(plain)


def test_room_check_reads_folder(monkeypatch, tmp_path):
    from fedimaging_app import batch_slots

    monkeypatch.setattr(batch_slots, "SHARED_MEMORY_FOLDER", str(tmp_path))
    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize
    assert batch_slots._room_for(free // batch_slots.SHARED_MEMORY_HEADROOM // 2)
    assert not batch_slots._room_for(free // batch_slots.SHARED_MEMORY_HEADROOM * 2)
    monkeypatch.setattr(batch_slots, "SHARED_MEMORY_FOLDER", str(tmp_path / "absent"))
    assert batch_slots._room_for(1 << 60)


def test_number_columns_keep_default_dtypes():
    class Numbers(Dataset):
        def __len__(self) -> int:
            return ITEMS

        def __getitem__(self, index: int) -> dict:
            return {"count": index, "weight": index / 4, "image": np.zeros((3, 96, 96), dtype=np.uint8)}

    loader = tile_loader(Numbers(), BATCH, num_workers=2)
    try:
        for batch, indices in zip(loader, _expected_batches(), strict=True):
            assert slot_of(batch["weight"]) is not None
            assert batch["count"].dtype == torch.int64
            assert batch["weight"].dtype == torch.float64
            assert batch["weight"].tolist() == [index / 4 for index in indices]
    finally:
        _close(loader)
