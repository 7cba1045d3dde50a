"""The KV cache the decoder reads: each row's prefix right-aligned, so sliding-window layers keep that row's window.

DiffusionGemma's sliding-window layers cache only the last W-1 positions the encoder read (transformers'
`DynamicSlidingWindowLayer`), and the decoder's sliding layers attend to exactly those plus the canvas. Alone, a
prompt of p tokens leaves its last min(p, W-1) tokens there. In a right-padded batch the last W-1 columns are the
longest row's: a shorter row's entries fall out of the window (padding is all that is left of it); and in training,
where the encoder reads the whole answer, they are the answer's end rather than the positions before block k.

`PrefixCache` keeps, per row, the entries of that row's prefix (prompt + the blocks before the canvas) moved to the
right end of the cache: column j of a width-S cache holds the row's position `prefix_len - S + j` (masked where that
is negative or padding). Each layer then keeps its usual columns (all S for full attention, the last W-1 for sliding
windows), which are now the positions just before the row's own canvas, as alone. The encoder itself is untouched:
it is causal, so a position's keys and values do not depend on padding or on what comes after it, and it still
reads (and returns, for its AR co-loss) the whole sequence. One 2D decoder mask (`decoder_attention_mask`) fits both
layer kinds, because both are aligned at the same right end. (Unsloth's DiffusionGemma objective arranges its
training cache the same way.) Inputs are right-padded, as everywhere in ftkit.

Cost: no extra encoder pass and no extra attention work (the decoder reads as many columns as before). Memory: each
layer stores a gathered copy (B x kv_heads x min(S, W-1) x head_dim keys and values for a sliding layer, S columns
for a full one) instead of what the encoder's update produced. In training that copy is extra while the forward
runs (the encoder's attention keeps its own keys/values for backward; the gather's backward keeps only the index):
computed for the released config (25 sliding layers of 8 x 256, 5 full of 2 x 512, W = 1024, bf16), 0.24 GB per row
of 1,536 tokens, 14 MB per row of 64. In generation (no grad) nothing more is held than before: a sliding layer
used to keep a view of all S columns, now it keeps its W-1.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from ftkit.model import arch


def right_aligned(attention_mask: torch.Tensor, prefix_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, mask), both (B, S): column j of row b reads sequence position `index[b, j]`, and is real iff
    `mask[b, j]` (inside the row's first `prefix_len[b]` positions and not padding)."""
    width = attention_mask.shape[1]
    source = prefix_len.to(attention_mask.device)[:, None] - width + torch.arange(width, device=attention_mask.device)
    index = source.clamp(0, width - 1)
    mask = (source == index) & attention_mask.bool().gather(1, index)
    return index, mask


class PrefixCache(DynamicCache):
    """A DynamicCache whose layers store each row's prefix right-aligned (`right_aligned`'s index). Written once,
    by one encoder forward over the whole (B, S) sequence; the decoder reads it as usual."""

    def __init__(self, config, index: torch.Tensor):
        super().__init__(config=config)
        self.config, self.index = config, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if key_states.shape[-2] != self.index.shape[1]:
            raise ValueError(
                f"PrefixCache is written once by an encoder pass over {self.index.shape[1]} positions; "
                f"layer {layer_idx} got {key_states.shape[-2]}"
            )
        # The encoder attends over the full states it returns; only what the layer stores is re-arranged.
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        kept = layer.keys.shape[-2]
        index = self.index[:, self.index.shape[1] - kept :].to(keys.device)[:, None, :, None]
        layer.keys = keys.gather(2, index.expand(-1, keys.shape[1], -1, keys.shape[-1]))
        layer.values = values.gather(2, index.expand(-1, values.shape[1], -1, values.shape[-1]))
        return keys, values


def prefix_cache_inputs(
    core: torch.nn.Module, attention_mask: torch.Tensor, prefix_len: torch.Tensor, canvas_length: int
) -> tuple[PrefixCache, torch.Tensor, torch.Tensor]:
    """For an encoder pass over `attention_mask`'s (B, S) sequence and a canvas after each row's first `prefix_len`
    positions: (an empty PrefixCache for that pass, the decoder's (B, S + L) attention mask, the canvas's (B, L)
    position ids)."""
    index, cache_mask = right_aligned(attention_mask, prefix_len)
    cache = PrefixCache(arch.decoder_text_config(core), index)
    canvas_mask = torch.ones((cache_mask.shape[0], canvas_length), dtype=torch.bool, device=cache_mask.device)
    positions = prefix_len.to(cache_mask.device)[:, None] + torch.arange(canvas_length, device=cache_mask.device)
    return cache, torch.cat([cache_mask, canvas_mask], dim=1), positions
