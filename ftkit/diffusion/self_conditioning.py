"""Self-conditioning for the memory-lean training step, computed the way the model computes it but cheaper.

The model turns first-pass logits into soft embeddings itself (`softmax(logits) @ E * embed_scale` inside
`DiffusionGemmaDecoderModel.forward`), which needs the whole (B, canvas, vocab) fp32 logits tensor plus its fp32
softmax and a bf16 copy: ~5 GB at batch 8 x 256 x 262k. Here the same soft embeddings are computed a chunk of
positions at a time, only for the examples whose self-conditioning coin came up (the rest would be zeroed anyway),
from a decoder pass that reuses the encoder's KV cache instead of re-encoding the prompt, and are handed to the
decoder's self-conditioning block through a forward pre-hook.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ftkit.errors import FtkitError
from ftkit.model import arch
from ftkit.model.arch import head_logits


def select_batch(cache, index: torch.Tensor):
    """A view of the KV cache holding only the examples in `index`; the original cache is left untouched.

    Each layer is copied shallowly and re-pointed at its rows (`batch_select_indices` rebinds keys/values rather than
    writing into them), so the copy costs the selected rows only."""
    subset = copy.copy(cache)
    subset.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        layer.batch_select_indices(index)
        subset.layers.append(layer)
    return subset


def embed_probabilities(probs: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The decoder's self-conditioning signal for token distributions `probs` (n, vocab): cast to the embedding
    dtype, @ E, * embed_scale (`weight`, `scale`: `arch.embedding_weight_and_scale`) — the model's own formula."""
    return torch.matmul(probs.to(weight.dtype), weight) * scale


@torch.no_grad()
def soft_embeddings(core: torch.nn.Module, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    """(b, L, H) soft embeddings from decoder hidden states, `chunk` positions at a time: head + soft-capping
    (`head_logits`), fp32 softmax, then `embed_probabilities`."""
    weight, scale = arch.embedding_weight_and_scale(core)
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], weight.shape[1], dtype=weight.dtype, device=hidden.device)
    for start in range(0, flat.shape[0], chunk):
        probs = head_logits(core, flat[start : start + chunk]).softmax(dim=-1, dtype=torch.float32)
        out[start : start + chunk] = embed_probabilities(probs, weight, scale)
    return out.view(*hidden.shape[:-1], weight.shape[1])


@contextmanager
def injected_soft_embeddings(core: torch.nn.Module, soft: torch.Tensor | None):
    """While active, the decoder's self-conditioning block receives `soft` instead of the zeros the decoder passes
    when it is given no self-conditioning logits. `None` leaves the block alone (no example self-conditioned)."""
    if soft is None:
        yield
        return

    def replace_signal(module, args):
        if len(args) != 2 or args[1].shape != soft.shape:
            raise FtkitError(
                "DiffusionGemma's self-conditioning block was called as (inputs_embeds, signal) when ftkit was "
                f"written; now it gets {len(args)} positional argument(s): this transformers version is unsupported"
            )
        return args[0], soft.to(args[1].dtype)

    handle = arch.self_conditioning_block(core).register_forward_pre_hook(replace_signal)
    try:
        yield
    finally:
        handle.remove()
