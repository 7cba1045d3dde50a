"""Device-independent memory meters: they count what a step allocates and keeps, so memory claims can be tested on
a CPU and measured at the real widths without a GPU.

- `LargestTensor`: the largest tensor any op produced (e.g. "no (B, L, vocab) logits tensor ever exists").
- `SavedActivations`: bytes autograd keeps for backward (distinct storages, model weights excluded), i.e. the
  activation memory alive at the end of the forward, which is what gradient checkpointing shrinks.
- `PeakLiveBytes`: the peak of the bytes held by tensors created inside the block and still alive, i.e. a CPU
  stand-in for `torch.cuda.max_memory_allocated` that works on any device (op outputs only: a kernel's private
  scratch memory is not seen).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """Within the `with` block, `.bytes` / `.shape` / `.op` describe the largest tensor output of any op; with
    `last_dim`, of any op output whose last dimension has that size (e.g. the vocabulary: logits-like tensors)."""

    def __init__(self, last_dim: int | None = None):
        super().__init__()
        self.last_dim = last_dim
        self.bytes = 0
        self.shape: tuple[int, ...] = ()
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or (
                self.last_dim is not None and (t.ndim == 0 or t.shape[-1] != self.last_dim)
            ):
                continue
            if t.numel() * t.element_size() > self.bytes:
                self.bytes, self.shape, self.op = t.numel() * t.element_size(), tuple(t.shape), str(func)
        return out


class SavedActivations:
    """Within the `with` block, counts the bytes of distinct storages autograd saves for backward, skipping the
    storages of `exclude` (the model's parameters and buffers: resident anyway, not activations).

    Storages are counted once however many views are saved; a tensor saved by a checkpointed region is not kept
    (only the region's inputs are), which is exactly the difference checkpointing makes."""

    def __init__(self, exclude: torch.nn.Module | None = None):
        self._skip = set()
        if exclude is not None:
            for t in (*exclude.parameters(), *exclude.buffers()):
                self._skip.add(t.untyped_storage().data_ptr())
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self._skip:
            self._seen[ptr] = max(self._seen.get(ptr, 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class PeakLiveBytes(TorchDispatchMode):
    """Within the `with` block, `.peak` is the largest number of bytes that tensors created inside the block held at
    once, and `.live` what they hold now. Each storage counts once, from the op that made it until the last tensor
    object viewing it is gone; views of tensors from outside the block (weights, inputs) are not counted.

    Tensors kept alive only by C++ (none in inference code) would be missed."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage pointer -> [live tensor objects, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        self.peak = max(self.peak, self.live)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if not ptr:
            return
        entry = self._storages.get(ptr)
        if entry is None:
            if ptr in inputs:
                return  # a view of (or an in-place op on) a tensor made outside the block
            entry = self._storages[ptr] = [0, storage.nbytes()]
            self.live += entry[1]
        entry[0] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[ptr]
