"""Which tensors an export holds, under which names: the released checkpoint's layout, key for key.

transformers saves a tied model without its tie targets (`_tied_weights_keys`: every encoder text weight is the
decoder's, the head is the decoder's embeddings), so a checkpoint holds the sources only. Two forms:

- tied: the base checkpoint's own keys. Right when both stacks get one update (a `lora.shared_stacks` adapter or
  a full fine-tune): the released layout and size, what vLLM's single-backbone DiffusionGemma loads.
- untied: `tie_word_embeddings: false` in the config undoes every tie, and every tie target is stored as well, as
  transformers' save_pretrained of an untied model writes it. Needed when the encoder and the decoder carry
  separate adapters: their merged weights differ.

Tie targets and sources come from transformers (`ftkit.model.arch.tied_targets`: the architecture built on the meta
device), never from a list of ftkit's own; `arch.untie` gives the untied form's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ftkit.errors import FtkitError

TIED, UNTIED = "tied", "untied"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class SourceTensor:
    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class OutputTensor:
    key: str  # the name in the export
    source: SourceTensor  # the base tensor it starts from
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.source.shape:
            n *= d
        return n * self.dtype.itemsize


def checkpoint_files(folder: Path) -> list[Path]:
    """A saved model's safetensors files in order: the index's shards, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise FtkitError(f"{index}: not a safetensors index (no weight_map)") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise FtkitError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}: the export merges from safetensors weights only")


def source_tensors(folder: Path) -> list[SourceTensor]:
    """Every tensor of the checkpoint in `folder`, file by file, from the headers only."""
    from safetensors import safe_open

    found = []
    for path in checkpoint_files(folder):
        if not path.is_file():
            raise FtkitError(f"{path}: missing (named by {folder / INDEX_FILE})")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    view = f.get_slice(key)
                    found.append(SourceTensor(key, path, tuple(view.get_shape()), _torch_dtype(view.get_dtype(), path)))
        except FtkitError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise FtkitError(f"{path}: not a readable safetensors file ({e.__class__.__name__}: {e})") from None
    return found


def _torch_dtype(name: str, path: Path) -> torch.dtype:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    if name not in table:
        raise FtkitError(f"{path}: tensors of type {name} are not supported by the export")
    return table[name]


def output_plan(sources: list[SourceTensor], ties: dict[str, str], form: str, dtype: torch.dtype) -> list[OutputTensor]:
    """The export's tensors in the base checkpoint's order (layer by layer); in the untied form each source is
    followed by its tie targets. Floating tensors are cast to `dtype`; others keep theirs."""
    by_key = {s.key: s for s in sources}
    targets_of: dict[str, list[str]] = {}
    for target, source in ties.items():
        targets_of.setdefault(source, []).append(target)
    plan = []
    for source in sources:
        if source.key in ties:
            if form == TIED:
                continue  # a tie target some saver wrote anyway: transformers ignores it, and so does the export
            if ties[source.key] in by_key:
                continue  # written beside its source, below
        keys = [source.key] + (sorted(targets_of.get(source.key, [])) if form == UNTIED else [])
        out_dtype = dtype if source.dtype.is_floating_point else source.dtype
        for key in keys:
            plan.append(OutputTensor(key, by_key.get(key, source), out_dtype))
    missing = [t for t, s in ties.items() if s not in by_key and t not in by_key]
    if missing:
        raise FtkitError(f"the base checkpoint has neither {missing[0]} nor its tie source {ties[missing[0]]}")
    return plan


def shard_plan(plan: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Consecutive tensors packed into shards of at most `max_shard_bytes` (a bigger tensor gets a shard alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in plan:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' names: one model.safetensors, or model-0000i-of-0000N.safetensors with an index."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
