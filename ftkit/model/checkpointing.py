"""Gradient checkpointing for both stacks, the encoder's KV-cache writes included.

transformers checkpoints only the decoder layers: an encoder layer writes its keys/values into the shared cache,
and a recompute would append them a second time. `enable_encoder_checkpointing` makes each encoder layer run under
non-reentrant `torch.utils.checkpoint` with the cache write kept exactly once: the first run writes through the
real cache; the recompute in backward writes into a copy of the cache as it was before (empty for that layer), so
it runs the same operations and sees the same tensors as the first run.
The cache the decoder reads keeps the first run's tensors, whose autograd graph the recompute serves.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.checkpoint import checkpoint

from ftkit.model import arch
from ftkit.model.compat import (
    ENCODER_CACHE_ARGUMENTS,
    SUPPORTED,
    disable_decoder_checkpointing,
    enable_decoder_checkpointing,
)
from ftkit.model.mixins import add_mixin, remove_mixin


class _ReplayCache:
    """The cache an encoder layer sees while checkpoint recomputes it: the write goes to a fresh copy of the cache
    as it was before the first run (shallow: no tensor is copied), so the recompute runs the very operations the
    first write ran (a `PrefixCache` re-arranges what it stores, and checkpoint needs the same tensors saved for
    backward in both runs) and returns the same states, while the real cache is written once."""

    def __init__(self, before):
        self.before = before

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return _snapshot(self.before).update(key_states, value_states, layer_idx, *args, **kwargs)


def _snapshot(cache):
    """A shallow copy of `cache` whose layers are copies too: writing into it leaves `cache` as it is."""
    copied = copy.copy(cache)
    copied.layers = [copy.copy(layer) for layer in cache.layers]
    return copied


def _cache_is_empty(cache, layer_idx: int) -> bool:
    return cache is None or cache.get_seq_length(layer_idx) == 0


def _find_cache(args: tuple, kwargs: dict) -> tuple[str, object]:
    """(argument name, cache) of the KV cache this encoder layer call writes into; ("", None) without one.

    The name changed across transformers releases (ftkit.model.compat.ENCODER_CACHE_ARGUMENTS). A cache passed any other
    way would be written twice by the recompute, silently, so it is refused instead."""
    from transformers.cache_utils import Cache

    found = [(name, kwargs[name]) for name in ENCODER_CACHE_ARGUMENTS if kwargs.get(name) is not None]
    unknown = [
        name for name, value in kwargs.items() if isinstance(value, Cache) and name not in ENCODER_CACHE_ARGUMENTS
    ]
    if unknown or len(found) > 1 or any(isinstance(a, Cache) for a in args):
        where = unknown or [name for name, _ in found][1:] or ["a positional argument"]
        raise RuntimeError(
            f"encoder checkpointing: this transformers release passes the encoder layer's KV cache as {where[0]!r}, "
            f"which ftkit does not know (it knows {ENCODER_CACHE_ARGUMENTS}); the recompute would write the prompt "
            f"into the cache twice. Use transformers{SUPPORTED} or train.checkpoint_encoder=false"
        )
    return found[0] if found else ("", None)


class CheckpointedEncoderLayer:
    """Mixin placed in front of the encoder layer class (the module keeps its parameters and names)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        layer_forward = super().forward
        name, cache = _find_cache(args, kwargs)
        # Only a training forward that writes the first entry of this layer's cache is checkpointed: a cache that
        # already holds a prefix (generation extending a block) would return prefix + new states on the write.
        if not (self.training and torch.is_grad_enabled()):
            return layer_forward(hidden_states, *args, **kwargs)
        if cache is None:  # the encoder always passes one (it makes a DynamicCache when given none)
            raise RuntimeError(
                f"encoder checkpointing: encoder layer {self.layer_idx} got no KV cache under a name ftkit knows "
                f"{ENCODER_CACHE_ARGUMENTS}; the recompute could write the prompt into it twice. Use "
                f"transformers{SUPPORTED} or train.checkpoint_encoder=false"
            )
        if not _cache_is_empty(cache, self.layer_idx):
            return layer_forward(hidden_states, *args, **kwargs)
        before = _snapshot(cache)
        runs = []

        def run(hidden):
            first = not runs
            runs.append(1)
            if first:
                out = layer_forward(hidden, *args, **kwargs)
            else:
                out = layer_forward(hidden, *args, **{**kwargs, name: _ReplayCache(before)})
            if cache.get_seq_length(self.layer_idx) != hidden.shape[-2]:
                # The write is ftkit's to keep to one; a release that writes elsewhere too must not train silently.
                raise RuntimeError(
                    f"encoder checkpointing: layer {self.layer_idx}'s cache holds "
                    f"{cache.get_seq_length(self.layer_idx)} positions after "
                    f"{'the first run' if first else 'the recompute'}, not the prompt's {hidden.shape[-2]}. "
                    f"Use transformers{SUPPORTED} or train.checkpoint_encoder=false"
                )
            return out

        return checkpoint(run, hidden_states, use_reentrant=False)


def enable_encoder_checkpointing(model: torch.nn.Module) -> int:
    """Checkpoint every encoder text layer (in place; idempotent). Returns how many layers are checkpointed."""
    layers = arch.encoder_layers(model)
    for layer in layers:
        add_mixin(layer, CheckpointedEncoderLayer, "Checkpointed")
    return len(layers)


def set_gradient_checkpointing(model: torch.nn.Module, on: bool, encoder: bool = True) -> None:
    """Decoder layers through transformers (non-reentrant: a reentrant replay would rewrite the encoder's cache) and,
    with `encoder`, the encoder layers through this module. `on=False` turns both off."""
    core = arch.unwrap_model(model)
    if on:
        enable_decoder_checkpointing(core, use_reentrant=False)
        if encoder:
            enable_encoder_checkpointing(model)
    else:
        disable_decoder_checkpointing(core)
        disable_encoder_checkpointing(model)


def disable_encoder_checkpointing(model: torch.nn.Module) -> None:
    for layer in arch.encoder_layers(model):
        remove_mixin(layer, CheckpointedEncoderLayer)
