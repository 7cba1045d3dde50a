"""The reference DiffusionGemma training objective (TRL, NeMo and Google agree), as one function.

Per example: one response block is chosen uniformly (a response longer than one canvas has several; block
diffusion trains one per step); t ~ U(eps, 1); each token of that block's clean canvas (EOS-filled past the
response) replaced by a uniform random token with prob. t; with prob. `self_conditioning_p` the decoder is
conditioned on its own logits from a first, no-grad pass; flat cross-entropy over every canvas position (the EOS fill
included: the uniform kernel has a flat ELBO, so no 1/t weighting); plus an autoregressive cross-entropy on the
encoder, which reads the whole clean sequence (prompt + response, real tokens only) while the decoder reads each
row's cache up to the chosen block's start, right-aligned (`prefix_cache.py`: its sliding-window layers keep the
W-1 positions before the block, as in generation), and the canvas positions continue from there.

Two paths compute the same values: `_reference_losses` (one `model(...)` call per pass, as TRL runs it) and, when
`diffusion.loss_chunk > 0`, `_lean_losses` (encoder once, first pass only where needed, everything over the
vocabulary chunked). Both draw the same randomness from the generator in the same order (block, noise level,
corruption, self-conditioning gate), and both run inside the DDP wrapper's forward when there is one
(`as_wrapper_forward`), so gradients are all-reduced either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftkit.diffusion.corrupt import corrupt_canvas, sample_noise_level
from ftkit.diffusion.means import mean_over_targets
from ftkit.diffusion.prefix_cache import PrefixCache, prefix_cache_inputs
from ftkit.diffusion.self_conditioning import injected_soft_embeddings, select_batch, soft_embeddings
from ftkit.model import arch
from ftkit.model.arch import head_logits
from ftkit.recipe import DiffusionSection


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() sees
    diffusion: torch.Tensor  # detached parts, for logging
    encoder: torch.Tensor
    t_mean: torch.Tensor
    self_conditioned: torch.Tensor  # fraction of examples that were self-conditioned
    t: torch.Tensor  # (B,) noise level per example, detached
    per_example: torch.Tensor  # (B,) canvas CE per example, detached: the noise-level vs loss curve
    block: torch.Tensor | None = None  # (B,) the response block each example trained on
    # (B, L) canvas CE per position with its graph: per-example likelihood (ELBO) estimates are built from it
    # (ftkit rl).
    token_losses: torch.Tensor | None = None


def chunked_head_token_losses(
    core: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, ignore_index: int = -100
) -> torch.Tensor:
    """Per-position CE of head_logits(hidden) against targets (0 where ignored), shaped like `targets`, without
    materializing all fp32 logits at once: each chunk of positions is recomputed in backward (activation
    checkpointing), so only one chunk of logits is alive at a time."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = targets.reshape(-1)

    def chunk_losses(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head_logits(core, h), y, ignore_index=ignore_index, reduction="none")

    parts = []
    for start in range(0, flat_h.shape[0], chunk):
        h, y = flat_h[start : start + chunk], flat_y[start : start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(chunk_losses, h, y, use_reentrant=False))
        else:
            parts.append(chunk_losses(h, y))
    return torch.cat(parts).view(targets.shape)


def encoder_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets for the encoder's AR co-loss over all valid (token, next token) pairs; -100 elsewhere."""
    pair_ok = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return torch.where(pair_ok, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))


def decoder_inputs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    canvas_ids: torch.Tensor,
    block_start: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Model kwargs for a training forward: the encoder reads the whole clean sequence and writes a `PrefixCache`
    holding each row's positions before its block start (default: the prompt's end, i.e. block 0), right-aligned,
    so the decoder sees what generation gives that block (prompt + earlier blocks, the sliding window applied per
    row); canvas positions continue from the block start. The cache is written by the call that reads these kwargs:
    a second call needs `with_fresh_cache`."""
    start = batch["prompt_len"] if block_start is None else block_start
    cache, mask, positions = prefix_cache_inputs(
        arch.unwrap_model(model), batch["attention_mask"], start, canvas_ids.shape[1]
    )
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "past_key_values": cache,
        "decoder_input_ids": canvas_ids,
        "decoder_attention_mask": mask,
        "decoder_position_ids": positions,
    }


def with_fresh_cache(kwargs: dict) -> dict:
    """`decoder_inputs`'s kwargs with an empty cache of the same layout, for another model call."""
    used = kwargs["past_key_values"]
    return {**kwargs, "past_key_values": PrefixCache(used.config, used.index)}


def choose_blocks(
    batch: dict[str, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One response block per example, uniformly among its blocks, as the reference draws it: (the clean canvas of
    that block (B, L), its start in the sequence (B,), its index (B,)).

    An example's block count comes from its response length (`attention_mask` past `prompt_len`); `canvas` is
    (B, K, L) from `ftkit.diffusion.token_layout.collate`, or (B, L) for single-block batches. The draw comes from the
    loss's generator, so a resumed run picks the blocks an uninterrupted one would."""
    blocks = batch["canvas"] if batch["canvas"].dim() == 3 else batch["canvas"][:, None]
    bsz, count, length = blocks.shape
    response_len = batch["attention_mask"].sum(dim=1) - batch["prompt_len"]
    num_blocks = ((response_len - 1).clamp(min=0) // length + 1).clamp(max=count)
    index = (torch.rand(bsz, generator=generator, device=blocks.device) * num_blocks).long()
    target = blocks[torch.arange(bsz, device=blocks.device), index]
    return target, batch["prompt_len"] + index * length, index


def diffusion_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: DiffusionSection, generator: torch.Generator
) -> LossOutput:
    core = arch.unwrap_model(model)
    target, block_start, block = choose_blocks(batch, generator)
    bsz = target.shape[0]
    device = target.device
    vocab = arch.vocab_size(core)

    t = sample_noise_level(bsz, cfg.eps, generator, device)
    noisy, _ = corrupt_canvas(target, t, vocab, generator)
    kwargs = decoder_inputs(core, batch, noisy, block_start)
    # Self-conditioning is gated per example; the gate is drawn after the corruption on both paths.
    sc_mask = torch.rand(bsz, generator=generator, device=device) < cfg.self_conditioning_p
    self_conditioning = sc_mask if cfg.self_conditioning_p > 0 else None
    enc_targets = encoder_targets(batch["input_ids"], batch["attention_mask"]) if cfg.encoder_loss_weight > 0 else None

    if cfg.loss_chunk > 0:
        token_losses, enc = as_wrapper_forward(
            model, lambda: _lean_losses(core, kwargs, target, enc_targets, self_conditioning, cfg.loss_chunk)
        )
    else:
        token_losses, enc = _reference_losses(model, core, kwargs, target, enc_targets, self_conditioning)
    diff = token_losses.mean()
    if enc is None:
        enc = diff.new_zeros(())
    loss = diff + cfg.encoder_loss_weight * enc
    return LossOutput(
        loss=loss,
        diffusion=diff.detach(),
        encoder=enc.detach(),
        t_mean=t.mean().detach(),
        self_conditioned=sc_mask.float().mean() if self_conditioning is not None else torch.zeros((), device=device),
        t=t.detach(),
        per_example=token_losses.detach().mean(dim=1),
        block=block,
        token_losses=token_losses,
    )


def _reference_losses(model, core, kwargs, target, enc_targets, sc_mask):
    """The objective exactly as the reference implementations run it: a no-grad first call of the whole model for
    the self-conditioning logits, then the training call. It goes through `model(...)`, so DDP sees the forward."""
    if sc_mask is not None:
        with torch.no_grad():
            first = model(**kwargs).logits.detach()
        kwargs = {**with_fresh_cache(kwargs), "self_conditioning_logits": first, "self_conditioning_mask": sc_mask}
    out = model(**kwargs)
    token_losses = F.cross_entropy(out.logits.transpose(1, 2), target, reduction="none")
    enc = None
    if enc_targets is not None:
        enc_logits = head_logits(core, out.encoder_last_hidden_state[:, :-1])
        enc = F.cross_entropy(enc_logits.flatten(0, 1), enc_targets.flatten(), ignore_index=-100)
    return token_losses, enc


_NO_FORWARD = object()


def as_wrapper_forward(model: torch.nn.Module, compute):
    """`compute()`, run as the forward of `model` when `model` is a DistributedDataParallel wrapper.

    DDP all-reduces gradients only for a forward that went through it: its forward marks which parameters the
    step's graph reaches (`find_unused_parameters`) and arms the reducer for backward. The lean path calls the
    encoder, decoder and head directly, so under DDP it is run as the wrapped module's forward for this one call:
    DDP does its pre- and post-forward work around it exactly as around `model(**batch)`. Outside DDP it is just
    `compute()`."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return compute()
    inner = model.module
    # An instance attribute shadows the class's forward; accelerate may already have put its own there (autocast
    # wrapper), so whatever was there is put back.
    saved = inner.__dict__.get("forward", _NO_FORWARD)
    inner.forward = lambda *args, **kwargs: compute()
    try:
        return model()
    finally:
        if saved is _NO_FORWARD:
            del inner.forward
        else:
            inner.forward = saved


DECODER_KEYS = ("decoder_input_ids", "decoder_attention_mask", "decoder_position_ids")


def _lean_losses(core, kwargs, target, enc_targets, sc_mask, chunk: int):
    """The same objective with the same values, computed leaner (diffusion.loss_chunk > 0):
    - the encoder runs once (the reference re-encodes the prompt in the no-grad pass) and writes the KV cache;
    - the no-grad first decoder pass runs on the self-conditioned examples only (the others' signal is zero), and
      its soft embeddings are computed `chunk` positions at a time (`self_conditioning.py`);
    - head + cross-entropy are chunked and recomputed in backward: no (B, L, vocab) tensor exists at any point.
    It calls the encoder and decoder directly; under DDP the caller runs it through `as_wrapper_forward`."""
    encoded = arch.encoder(core)(
        input_ids=kwargs["input_ids"],
        attention_mask=kwargs["attention_mask"],
        past_key_values=kwargs["past_key_values"],
    )
    cache = encoded.past_key_values
    decoder_kwargs = {key: kwargs[key] for key in DECODER_KEYS}
    soft = None
    if sc_mask is not None and bool(sc_mask.any()):
        index = sc_mask.nonzero().squeeze(1)
        with torch.no_grad():
            first = arch.decoder(core)(
                past_key_values=select_batch(cache, index), **{key: v[index] for key, v in decoder_kwargs.items()}
            )
            picked = soft_embeddings(core, first.last_hidden_state, chunk)
        soft = picked.new_zeros((sc_mask.shape[0], *picked.shape[1:])).index_copy_(0, index, picked)
    with injected_soft_embeddings(core, soft):
        hidden = arch.decoder(core)(past_key_values=cache, **decoder_kwargs).last_hidden_state
    token_losses = chunked_head_token_losses(core, hidden, target, chunk)
    enc = None
    if enc_targets is not None:
        enc_losses = chunked_head_token_losses(core, encoded.last_hidden_state[:, :-1], enc_targets, chunk)
        enc = mean_over_targets(enc_losses, enc_targets)
    return token_losses, enc
