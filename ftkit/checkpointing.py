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

from ftkit.mixins import add_mixin, remove_mixin


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


class CheckpointedEncoderLayer:
    """Mixin placed in front of the encoder layer class (the module keeps its parameters and names)."""

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        layer_forward = super().forward
        # Only a training forward that writes the first entry of this layer's cache is checkpointed: a cache that
        # already holds a prefix (generation extending a block) would return prefix + new states on the write.
        if not (self.training and torch.is_grad_enabled() and _cache_is_empty(past_key_values, self.layer_idx)):
            return layer_forward(hidden_states, *args, past_key_values=past_key_values, **kwargs)
        before = _snapshot(past_key_values) if past_key_values is not None else None
        runs = []

        def run(hidden):
            cache = past_key_values if not runs or past_key_values is None else _ReplayCache(before)
            runs.append(1)
            return layer_forward(hidden, *args, past_key_values=cache, **kwargs)

        return checkpoint(run, hidden_states, use_reentrant=False)


def encoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from ftkit.diffusion.loss import core_model

    return list(core_model(model).model.encoder.language_model.layers)


def enable_encoder_checkpointing(model: torch.nn.Module) -> int:
    """Checkpoint every encoder text layer (in place; idempotent). Returns how many layers are checkpointed."""
    layers = encoder_layers(model)
    for layer in layers:
        add_mixin(layer, CheckpointedEncoderLayer, "Checkpointed")
    return len(layers)


def set_gradient_checkpointing(model: torch.nn.Module, on: bool, encoder: bool = True) -> None:
    """Decoder layers through transformers (non-reentrant: a reentrant replay would rewrite the encoder's cache) and,
    with `encoder`, the encoder layers through this module. `on=False` turns both off."""
    from ftkit.diffusion.loss import core_model

    core = core_model(model)
    if on:
        core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if encoder:
            enable_encoder_checkpointing(model)
    else:
        core.activation_checkpointing_disable()
        disable_encoder_checkpointing(model)


def disable_encoder_checkpointing(model: torch.nn.Module) -> None:
    for layer in encoder_layers(model):
        remove_mixin(layer, CheckpointedEncoderLayer)
