"""DistributedDataParallel over a model with 4-bit experts.

DDP broadcasts every parameter and buffer from rank 0 when it wraps the model, and every buffer again before each
forward (`broadcast_buffers`). For 4-bit experts both are wrong: the shape-only placeholder Parameters are one
element seen through stride 0, so a broadcast into them fails ("more than one element of the written-to tensor
refers to a single memory location"); and the NF4 codes (~12 GB at full depth) are identical on every rank already
(each rank quantizes the same checkpoint with the same deterministic kernel), so re-sending them each forward only
costs time. Both are frozen and never reach the reducer, which keeps all-reducing the LoRA gradients as before.
"""

from __future__ import annotations

from torch import nn

from ftkit.model.arch import EXPERT_TENSORS
from ftkit.model.quant.experts import QuantizedExperts
from ftkit.model.quant.nf4 import NF4Tensor


def quantized_state_names(model: nn.Module) -> list[str]:
    """Fully qualified names (every alias: encoder and decoder share them) of the placeholders and NF4 buffers."""
    names = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, QuantizedExperts):
            names += [dot + name for name in EXPERT_TENSORS]
        elif isinstance(module, NF4Tensor):
            names += [dot + name for name, buf in module.named_buffers(recurse=False) if buf is not None]
    return sorted(set(names))


def exclude_quantized_state_from_ddp(model: nn.Module) -> int:
    """Tell DDP (through its own hook, `_set_params_and_buffers_to_ignore_for_model`) to neither broadcast nor sync
    the 4-bit storage of `model`, the module DDP will wrap. Keeps names already excluded. Returns how many names are
    excluded now (0: nothing is quantized, the model is left as it was)."""
    from torch.nn.parallel import DistributedDataParallel

    names = quantized_state_names(model)
    if not names:
        return 0
    names = sorted(set(names) | set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return len(names)
