"""DataLoader batches that worker processes write into shared memory reused from batch to batch.

A torch ``DataLoader`` worker stacks every batch into new shared memory, and the main process
receives each tensor's file descriptor through a new socket connection and maps it. For cheap tiles
(an Aperio tile read at its own level costs about 1.2 ms on this project's benchmark machine) the
new pages and the hand-over cost about a tenth of the reading. Here every worker keeps a few shared
batch buffers ("slots") for each tensor of a batch and writes a later batch into a slot again once
the main process no longer refers to the batch it held there.

How a slot goes round:

* the worker's collate function stacks each tensor (and each column of numbers) of the batch into a
  free slot. The first time it sends the slot's buffer itself. After that it sends only a tag: the
  loader, the worker, the slot, its generation (how often it has been filled) and the batch length;
* the main process keeps the buffers it received. When it unpickles a tag it makes a new tensor on
  the slot's memory (``torch.from_numpy``, so every batch has its own storage object) and records a
  weak reference to that storage (``torch.multiprocessing.reductions.StorageWeakRef``). This also
  covers batches that the DataLoader drops when an iteration is abandoned;
* each time the loader hands out a batch, it checks those references. Once nothing in the main
  process refers to a batch's storage (views included), it puts the slot and generation on that
  worker's queue. The worker reads its queue before it looks for a free slot. The queue orders the
  release before the next write.

A worker whose slots are all held (for example by a caller who keeps every batch) stacks into new
shared memory as a plain DataLoader does. A caller may therefore keep batches; they are then only
not faster. A batch element of another kind (strings, ragged tensors) is collated as
``default_collate`` does. With no worker processes ``default_collate`` is used throughout.

Slots stay allocated while the workers live, which is as long as the loader: a ``SlotLoader``
always keeps its workers. A worker keeps a new slot only while ``/dev/shm`` has room for
``SHARED_MEMORY_HEADROOM`` more of it, so a small ``/dev/shm`` (64 MiB in a Docker container
started without ``--shm-size``) is left to the batches a plain DataLoader needs.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import queue
import threading
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, default_collate, get_worker_info
from torch.utils.data._utils.collate import (collate, collate_float_fn, collate_int_fn, collate_tensor_fn,
                                             default_collate_fn_map)

# A worker keeps a new slot only while the shared-memory file system has room for this many more.
SHARED_MEMORY_HEADROOM = 8
# Kinds of tensor per batch that get slots (for example image and label). Once a worker has slots for
# this many, further kinds go the plain way, and so do tensors whose shape changes between batches.
MAX_SLOTTED_TENSORS = 4
SHARED_MEMORY_FOLDER = "/dev/shm"

_tokens = itertools.count()
_lock = threading.Lock()
# Main process, per loader token: the slot buffers received, by (worker pid, slot), as numpy arrays.
_buffers: dict[tuple[int, int], dict[tuple[int, int], np.ndarray]] = {}
# Main process, per loader token: the slotted tensors handed out and not yet given back:
# (worker index, worker pid, slot, generation, weak reference to the tensor's storage).
_handed_out: dict[tuple[int, int], list[tuple[int, int, int, int, StorageWeakRef]]] = {}


def _room_for(nbytes: int) -> bool:
    """Return whether the shared-memory file system has room for ``SHARED_MEMORY_HEADROOM`` blocks of ``nbytes``."""
    try:
        stats = os.statvfs(SHARED_MEMORY_FOLDER)
    except OSError:  # no such folder (not Linux): torch's own shared memory decides
        return True
    return stats.f_bavail * stats.f_frsize >= SHARED_MEMORY_HEADROOM * nbytes


def _slot_tensor(token: tuple[int, int], worker: int, pid: int, slot: int, generation: int, length: int,
                 buffer: torch.Tensor | None) -> torch.Tensor:
    """Make, in the main process, the tensor of a batch that a worker wrote into a slot."""
    with _lock:
        buffers = _buffers.setdefault(token, {})
        if buffer is not None:  # the slot's first batch: keep its memory mapped for later batches
            buffers[(pid, slot)] = buffer.numpy()
        tensor = torch.from_numpy(buffers[(pid, slot)][:length])
        _handed_out.setdefault(token, []).append(
            (worker, pid, slot, generation, StorageWeakRef(tensor.untyped_storage())))
    return tensor


class _SlotTag:
    """Stand-in for a slotted tensor in a worker's batch; unpickling it makes the tensor."""

    def __init__(self, *arguments):
        self.arguments = arguments

    def __reduce__(self):
        return _slot_tensor, self.arguments


def slot_of(tensor: torch.Tensor) -> tuple[int, int] | None:
    """Return the (worker pid, slot) whose memory contains ``tensor`` in this process, or None."""
    address = tensor.data_ptr()
    with _lock:
        for buffers in _buffers.values():
            for key, array in buffers.items():
                if array.ctypes.data <= address < array.ctypes.data + array.nbytes:
                    return key
    return None


class SlotCollate:
    """The collate function of a :class:`SlotLoader`: ``default_collate`` that stacks into reused slots.

    ``slots_per_worker`` bounds the slots a worker keeps for each tensor of a batch. A slot has room
    for ``batch_size`` times one sample's tensor.
    """

    def __init__(self, num_workers: int, batch_size: int, slots_per_worker: int, context=None):
        context = context or multiprocessing.get_context()
        self.token = (os.getpid(), next(_tokens))
        self.batch_size = batch_size
        self.slots_per_worker = slots_per_worker
        self.releases = [context.Queue() for _ in range(num_workers)]
        self._reset_worker_state()

    def _reset_worker_state(self) -> None:
        # Each worker process has its own copy of this state.
        self._slots: list[torch.Tensor] = []
        self._generation: list[int] = []
        self._released: list[int] = []
        self._map = {**default_collate_fn_map, torch.Tensor: self._collate_tensors,
                     int: self._collate_numbers, float: self._collate_numbers}
        self._worker: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        return {key: self.__dict__[key] for key in ("token", "batch_size", "slots_per_worker", "releases")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_worker_state()

    # ---------------------------------------------------------------------------------- worker side
    def __call__(self, samples: list) -> Any:
        info = get_worker_info()
        if info is None:  # the main process reads (num_workers=0): nothing to reuse
            return default_collate(samples)
        self._worker = (info.id, os.getpid())
        self._take_releases()
        return collate(samples, collate_fn_map=self._map)

    def _take_releases(self) -> None:
        worker, pid = self._worker
        while True:
            try:
                released_pid, slot, generation = self.releases[worker].get_nowait()
            except queue.Empty:
                return
            if released_pid == pid:  # never a release meant for an earlier process of this worker
                self._released[slot] = max(self._released[slot], generation)

    def _free_slot(self, shape: tuple[int, ...], dtype: torch.dtype) -> int | None:
        same = [slot for slot, buffer in enumerate(self._slots) if buffer.shape == shape and buffer.dtype == dtype]
        for slot in same:
            if self._released[slot] == self._generation[slot]:
                return slot
        nbytes = math.prod(shape) * dtype.itemsize
        if (len(same) >= self.slots_per_worker or len(self._slots) >= self.slots_per_worker * MAX_SLOTTED_TENSORS
                or not _room_for(nbytes)):
            return None
        self._slots.append(torch.empty(shape, dtype=dtype).share_memory_())
        self._generation.append(0)
        self._released.append(0)
        return len(self._slots) - 1

    def _in_slot(self, shape: tuple[int, ...], dtype: torch.dtype, length: int, fill) -> _SlotTag | None:
        """Fill a free slot for a batch of ``length`` items with ``fill(out)``; return its tag, or None."""
        slot = self._free_slot((self.batch_size, *shape), dtype) if length <= self.batch_size else None
        if slot is None:  # no free slot of this shape, and no room for another
            return None
        fill(self._slots[slot][:length])
        first = self._generation[slot] == 0
        self._generation[slot] += 1
        worker, pid = self._worker
        return _SlotTag(self.token, worker, pid, slot, self._generation[slot], length,
                        self._slots[slot] if first else None)

    def _collate_tensors(self, batch: list[torch.Tensor], *, collate_fn_map=None):
        first = batch[0]
        if (first.is_nested or first.layout != torch.strided
                or any(t.shape != first.shape or t.dtype != first.dtype for t in batch)):
            return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
        tag = self._in_slot(tuple(first.shape), first.dtype, len(batch), lambda out: torch.stack(batch, 0, out=out))
        return tag if tag is not None else collate_tensor_fn(batch, collate_fn_map=collate_fn_map)

    def _collate_numbers(self, batch: list, *, collate_fn_map=None):
        # The dtype default_collate gives: int64 (or bool) for integers, float64 for floats.
        values = (collate_float_fn if isinstance(batch[0], float) else collate_int_fn)(batch)
        tag = self._in_slot((), values.dtype, len(batch), lambda out: out.copy_(values))
        return tag if tag is not None else values

    # ------------------------------------------------------------------------------------ main side
    def release_unused(self) -> None:
        """Give back to their workers the slots whose batches nothing in this process refers to."""
        free, in_use = [], []
        with _lock:
            # One test per entry: a batch dropped between two tests would otherwise be in neither list.
            for entry in _handed_out.get(self.token, []):
                (free if entry[4].expired() else in_use).append(entry)
            _handed_out[self.token] = in_use
        for worker, pid, slot, generation, _ in free:
            self.releases[worker].put((pid, slot, generation))

    def forget(self) -> None:
        """Drop this loader's slot buffers and records in this process."""
        with _lock:
            _buffers.pop(self.token, None)
            _handed_out.pop(self.token, None)


class SlotLoader(DataLoader):
    """A ``DataLoader`` with persistent workers that reuse shared batch buffers (see the module text).

    Batches have the structure and values ``default_collate`` gives them; a caller may keep them as
    long as it likes.
    """

    def __init__(self, dataset, *, batch_sampler, batch_size: int, num_workers: int, prefetch_factor: int = 2,
                 **kwargs):
        if num_workers < 1 or not kwargs.pop("persistent_workers", True):
            raise ValueError("SlotLoader needs num_workers >= 1 and persistent workers; use a DataLoader otherwise")
        context = kwargs.get("multiprocessing_context")
        if isinstance(context, str):
            context = multiprocessing.get_context(context)
        # In flight per worker: prefetch_factor batches, plus the batch the caller uses and the one
        # before it (a for loop rebinds its variable only after the next batch has arrived).
        self.slots = SlotCollate(num_workers, batch_size, prefetch_factor + 2, context)
        super().__init__(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                         prefetch_factor=prefetch_factor, persistent_workers=True, collate_fn=self.slots, **kwargs)

    def __iter__(self):
        # Give back what the last pass left before the workers take up new indices, and again
        # after an abandoned pass's read-ahead batches were dropped in starting this one.
        self.slots.release_unused()
        iterator = super().__iter__()
        self.slots.release_unused()
        box: list = []
        for batch in iterator:
            self.slots.release_unused()
            box.append(batch)
            batch = None
            yield box.pop()  # hold no reference here while the caller uses the batch
        self.slots.release_unused()

    def __del__(self):
        slots = self.__dict__.get("slots")
        if slots is not None:
            slots.forget()
