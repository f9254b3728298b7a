"""DataLoader batches that worker processes write into reused shared memory.

A torch ``DataLoader`` worker stacks every batch into a new shared-memory block. The kernel zeroes
each new page on first touch, and for cheap tiles (an Aperio tile read at its own level costs about
1.2 ms on this project's benchmark machine) that costs about a tenth of the read. Here every worker
keeps a few shared batch buffers ("slots") and writes later batches into a slot again once the main
process no longer refers to the batch it held.

How a slot comes back:

* the worker's collate function stacks each large tensor of the batch into a free slot and sends
  the batch with a tag naming the worker, the slot and the slot's generation (how often it has been
  filled);
* when the main process unpickles the tag, it records a weak reference to the batch tensor's
  storage (``torch.multiprocessing.reductions.StorageWeakRef``). This also covers batches that the
  DataLoader drops when an iteration is abandoned;
* each time the loader hands out a batch, it checks those references. Once nothing in the main
  process refers to a storage (views included), it puts ``(slot, generation)`` on that worker's
  queue. The worker reads its queue before it looks for a free slot. The queue orders the release
  before the next write.

A worker whose slots are all held (for example by a caller who keeps every batch) stacks into new
shared memory as a plain DataLoader does. A caller may therefore keep batches; they are then only
not faster. With
no worker processes the plain ``default_collate`` is used.

Slots stay allocated while the workers live (for persistent workers, as long as the loader). A
worker keeps a new slot only while ``/dev/shm`` has room for ``SHARED_MEMORY_HEADROOM`` more of it,
so a small ``/dev/shm`` (64 MiB in a Docker container started without ``--shm-size``) is left to
the batches a plain DataLoader needs.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import queue
import threading
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, default_collate, get_worker_info
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map

# Tensors whose full batch is smaller than this go the plain way: their shared memory costs little.
MIN_SLOT_BYTES = 256 * 1024
# A worker keeps a new slot only while the shared-memory file system has room for this many more.
SHARED_MEMORY_HEADROOM = 8
SHARED_MEMORY_FOLDER = "/dev/shm"

_tokens = itertools.count()
# Main process: per loader token, the slotted batches received and not yet released:
# (worker, slot, generation, weak reference to the storage).
_received: dict[tuple[int, int], list[tuple[int, int, int, StorageWeakRef]]] = {}
_received_lock = threading.Lock()


def _room_for(nbytes: int) -> bool:
    """Return whether the shared-memory file system has room for ``SHARED_MEMORY_HEADROOM`` blocks of ``nbytes``."""
    try:
        stats = os.statvfs(SHARED_MEMORY_FOLDER)
    except OSError:  # no such folder (not Linux): torch's own shared memory decides
        return True
    return stats.f_bavail * stats.f_frsize >= SHARED_MEMORY_HEADROOM * nbytes


class _TaggedBatch:
    """A worker's batch with the slots its tensors were written into; unwrapped by the main process."""

    def __init__(self, token: tuple[int, int], worker: int, batch: Any, slotted: list[tuple[int, int, torch.Tensor]]):
        self.token, self.worker, self.batch, self.slotted = token, worker, batch, slotted

    def __setstate__(self, state: dict) -> None:
        # Runs where the batch arrives (the main process). Keep only weak references to the slots'
        # storages, so that the batch alone decides when a slot is free again.
        self.__dict__.update(state)
        references = [(self.worker, slot, generation, StorageWeakRef(tensor.untyped_storage()))
                      for slot, generation, tensor in self.slotted]
        self.slotted = []
        with _received_lock:
            _received.setdefault(self.token, []).extend(references)


class SlotCollate:
    """The collate function of a :class:`SlotLoader`: ``default_collate`` that stacks into reused slots.

    ``slots_per_worker`` bounds the shared memory a worker keeps: that many buffers of
    ``batch_size`` times one sample's tensor, per large tensor of a sample.
    """

    def __init__(self, num_workers: int, batch_size: int, slots_per_worker: int, context=None):
        context = context or multiprocessing.get_context()
        self.token = (os.getpid(), next(_tokens))
        self.batch_size = batch_size
        self.slots_per_worker = slots_per_worker
        self.releases = [context.Queue() for _ in range(num_workers)]
        # Worker-side state; each worker process has its own copy.
        self._buffers: list[torch.Tensor] = []
        self._generation: list[int] = []
        self._released: list[int] = []
        self._tensor_map = {**default_collate_fn_map, torch.Tensor: self._collate_tensors}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_buffers"], state["_generation"], state["_released"] = [], [], []
        del state["_tensor_map"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tensor_map = {**default_collate_fn_map, torch.Tensor: self._collate_tensors}

    # ---------------------------------------------------------------------------------- worker side
    def __call__(self, samples: list) -> Any:
        info = get_worker_info()
        if info is None:  # the main process reads (num_workers=0): nothing to reuse
            return default_collate(samples)
        self._take_releases(info.id)
        self._slotted: list[tuple[int, int, torch.Tensor]] = []
        batch = collate(samples, collate_fn_map=self._tensor_map)
        slotted, self._slotted = self._slotted, []
        return _TaggedBatch(self.token, info.id, batch, slotted) if slotted else batch

    def _take_releases(self, worker: int) -> None:
        release = self.releases[worker]
        while True:
            try:
                slot, generation = release.get_nowait()
            except queue.Empty:
                return
            self._released[slot] = max(self._released[slot], generation)

    def _free_slot(self, like: torch.Tensor) -> int | None:
        shape = (self.batch_size, *like.shape)
        for slot, buffer in enumerate(self._buffers):
            if (self._released[slot] == self._generation[slot] and buffer.shape == shape
                    and buffer.dtype == like.dtype):
                return slot
        if len(self._buffers) >= self.slots_per_worker or not _room_for(math.prod(shape) * like.element_size()):
            return None
        self._buffers.append(torch.empty(shape, dtype=like.dtype).share_memory_())
        self._generation.append(0)
        self._released.append(0)
        return len(self._buffers) - 1

    def _collate_tensors(self, batch: list[torch.Tensor], *, collate_fn_map=None) -> torch.Tensor:
        first = batch[0]
        large = first.numel() * first.element_size() * self.batch_size >= MIN_SLOT_BYTES  # a full slot
        if (not large or len(batch) > self.batch_size or first.is_nested or first.layout != torch.strided
                or any(t.shape != first.shape or t.dtype != first.dtype for t in batch)):
            return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
        slot = self._free_slot(first)
        if slot is None:  # every slot is still held by the main process
            return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
        out = self._buffers[slot][:len(batch)]
        torch.stack(batch, 0, out=out)
        self._generation[slot] += 1
        self._slotted.append((slot, self._generation[slot], out))
        return out

    # ------------------------------------------------------------------------------------ main side
    def release_unused(self) -> None:
        """Give back to their workers the slots whose batches nothing in this process refers to."""
        with _received_lock:
            received = _received.get(self.token, [])
            in_use = [entry for entry in received if not entry[3].expired()]
            free = [entry for entry in received if entry[3].expired()]
            _received[self.token] = in_use
        for worker, slot, generation, _ in free:
            self.releases[worker].put((slot, generation))

    def forget(self) -> None:
        with _received_lock:
            _received.pop(self.token, None)


class SlotLoader(DataLoader):
    """A ``DataLoader`` whose workers reuse shared batch buffers (see the module text).

    Batches are the same objects a plain ``DataLoader`` with ``default_collate`` yields; a caller may
    keep them as long as it likes.
    """

    def __init__(self, dataset, *, batch_sampler, batch_size: int, num_workers: int, prefetch_factor: int = 2,
                 **kwargs):
        # In flight per worker: prefetch_factor batches, plus the batch the caller uses and the one
        # before it (a for loop rebinds its variable only after the next batch has arrived).
        context = kwargs.get("multiprocessing_context")
        if isinstance(context, str):
            context = multiprocessing.get_context(context)
        self.slots = SlotCollate(num_workers, batch_size, prefetch_factor + 2, context)
        super().__init__(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                         prefetch_factor=prefetch_factor, collate_fn=self.slots, **kwargs)

    def __iter__(self):
        # Give back what the last pass left before the workers take up new indices, and again
        # after an abandoned pass's read-ahead batches were dropped in starting this one.
        self.slots.release_unused()
        iterator = super().__iter__()
        self.slots.release_unused()
        box: list = []
        for item in iterator:
            self.slots.release_unused()
            box.append(item.batch if isinstance(item, _TaggedBatch) else item)
            item = None
            yield box.pop()  # hold no reference here while the caller uses the batch
        self.slots.release_unused()

    def __del__(self):
        slots = self.__dict__.get("slots")
        if slots is not None:
            slots.forget()
