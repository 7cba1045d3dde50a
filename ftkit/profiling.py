"""Device-independent memory meters: they count what a step allocates and keeps, so memory claims can be tested on
a CPU and measured at the real widths without a GPU.

- `LargestTensor`: the largest tensor any op produced (e.g. "no (B, L, vocab) logits tensor ever exists").
- `SavedActivations`: bytes autograd keeps for backward (distinct storages, model weights excluded), i.e. the
  activation memory alive at the end of the forward, which is what gradient checkpointing shrinks.
"""

from __future__ import annotations

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
            if not isinstance(t, torch.Tensor) or (self.last_dim is not None and (t.ndim == 0 or t.shape[-1] != self.last_dim)):
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
