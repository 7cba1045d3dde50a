"""Write an export's weights shard by shard, each tensor read from the base when its shard is written.

Host memory holds one output shard (safetensors writes a file from a dict of tensors) plus the tensor being
merged: the source as read, its output, and a few experts' fp32 update. Nothing else of the model is ever loaded,
and no GPU is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ftkit.export.layout import INDEX_FILE, OutputTensor, shard_names


def return_freed_memory_to_os() -> bool:
    """Have glibc give every large freed block back to the OS at once (a fixed mmap threshold, as
    MALLOC_MMAP_THRESHOLD_ does). By default glibc raises its threshold after each large free, so the next tensors
    come from a heap it keeps: the export's resident memory would creep up by several tensors' worth. Process-wide;
    `ftkit export` calls it. Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return mallopt is not None and mallopt(m_mmap_threshold, 1 << 20) == 1


class SourceReader:
    """Open safetensors files by path, reading one tensor at a time (memory-mapped headers; data on demand)."""

    def __init__(self):
        self.files: dict[Path, object] = {}

    def tensor(self, path: Path, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if path not in self.files:
            self.files[path] = safe_open(str(path), framework="pt")
        return self.files[path].get_tensor(key)


def write_shards(
    folder: Path,
    shards: list[list[OutputTensor]],
    make: Callable[[OutputTensor, SourceReader], torch.Tensor],
    on_shard: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write `shards` into `folder` (with transformers' index when there are several); `make(tensor, reader)` gives
    each tensor's values. Returns the file names written."""
    from safetensors.torch import save_file

    names = shard_names(len(shards))
    reader = SourceReader()
    weight_map, total = {}, 0
    for i, (name, shard) in enumerate(zip(names, shards)):
        tensors = {}
        for planned in shard:
            value = make(planned, reader)
            if tuple(value.shape) != planned.source.shape or value.dtype != planned.dtype:
                raise AssertionError(
                    f"{planned.key}: made {tuple(value.shape)} {value.dtype}, planned "
                    f"{planned.source.shape} {planned.dtype}"
                )
            tensors[planned.key] = value.contiguous()
            weight_map[planned.key] = name
            total += planned.nbytes
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors  # the shard's memory goes before the next one is built
        if on_shard is not None:
            on_shard(i + 1, len(shards))
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return [*names, INDEX_FILE]
    return names
