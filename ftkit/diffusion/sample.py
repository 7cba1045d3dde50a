"""Constrained denoising: DiffusionGemma's entropy-bound sampler with clamped positions, per-position token masks
and verifier re-noising.

One canvas per call (answers longer than one canvas go block after block through `ftkit/diffusion/blocks.py`).
The building blocks are transformers' own where they fit:

- `LinearTemperatureScheduleLogitsProcessor`: the temperature schedule, called with the *remaining* step count as
  `generate` does (t_max at the first step, t_min + (t_max - t_min) / steps at the last).
- `EntropyBoundSampler.accept_canvas`'s rule (lowest-entropy tokens whose summed entropy, minus the largest, stays
  under the bound) is applied by `accept_lowest_entropy` to entropies computed chunk by chunk: the library's method
  takes the whole (batch, canvas, vocab) logits tensor. tests/test_sample.py checks both agree. Its
  `initialize_canvas` / `renoise_canvas` are NOT used: they draw from the global RNG over the whole batch, so a row's
  result would depend on its batch neighbours. Every random draw here comes from that row's own generator instead.
- `StableAndConfidentStoppingCriteria`: the stability half (argmax canvas unchanged for `stability_threshold`
  steps) is reused as is; the confidence half is computed over the *free* positions only (`_FreeStableConfident`),
  because clamped positions have zero entropy by construction and would dilute the mean.

Memory: the decoder returns hidden states, and everything over the vocabulary (head, soft-capping, temperature,
masks, softmax, entropy, argmax, the draw, the self-conditioning signal) runs `chunk` canvas positions at a time,
so no (batch, canvas, vocab) tensor exists: at Gemma's 262k vocabulary the old full-width path held about eight
fp32 copies of it per step (~34 GB at batch 16 x 256). Self-conditioning keeps the next step's signal as soft
embeddings (batch, canvas, hidden) made from the processed probabilities by the decoder's own formula
(softmax @ embeddings * embed_scale, as `self_conditioning.soft_embeddings` does in training), and hands them to the
decoder through the same hook as the lean training step. A token is drawn by inverse CDF from one
uniform per position, so a draw does not depend on the chunking.

Design choices:

- Clamping works twice: the logits at a fixed position are pinned to a one-hot on the given token (so it costs
  nothing in the entropy budget, never blocks stopping, and self-conditioning sees the truth), and the canvas is
  written back from `canvas_init` after every step (so fixed positions never change, whatever the model says).
- Token masks (`allowed`, built by `ftkit.diffusion.token_layout.allowed_tokens`): every other token's logit is -inf
  at a masked position on every step, before sampling, acceptance, stopping and self-conditioning, so the argmax
  canvas (the output) only holds allowed tokens: Sudoku cells are digits, a protein span is residues, and no stop
  token comes before the last fixed piece. The noise that re-fills rejected positions stays uniform over the
  vocabulary: it is the corruption the model was trained on.
- Verifier re-noising runs after a denoising pass has stopped (converged or out of steps), not every k steps: the
  verifier judges a finished answer, and mid-trajectory canvases are mostly noise by design. The violating free
  positions get fresh uniform tokens; every other position is pinned to its current value for the round; the round
  is a new denoising pass (fresh schedule, no self-conditioning on the first step) over the same prompt cache.
  Up to `max_renoise_rounds` rounds, each with the full `steps` budget; only rows with violations run.
- The output is the argmax canvas of the last step, as `generate` returns it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from ftkit.diffusion.prefix_cache import prefix_cache_inputs
from ftkit.diffusion.self_conditioning import embed_probabilities, injected_soft_embeddings
from ftkit.diffusion.token_layout import AllowedTokens
from ftkit.model import arch
from ftkit.model.arch import head_logits

# A pinned position's logits: 0 on the given token, this much lower elsewhere (exp(-1e4) is 0 in float32).
_PINNED_GAP = 1e4
# Vocabulary-wide work is done this many (position x vocabulary) elements at a time: 256 positions of Gemma's 262k
# vocabulary, i.e. 256 MB per fp32 chunk tensor; a small vocabulary takes the whole batch in one chunk.
CHUNK_ELEMENTS = 1 << 26

Verifier = Callable[[torch.Tensor], list[list[int]]]


@dataclass
class DenoiseResult:
    canvas: torch.Tensor  # (B, L) final token ids
    steps_used: torch.Tensor  # (B,) decoder passes spent on each example, re-noising rounds included
    forward_passes: int  # batched decoder forward calls
    tokens_per_forward: float  # generated tokens / decoder passes, averaged over examples (see _tokens_per_forward)
    trajectory: list[torch.Tensor] = field(default_factory=list)  # (B, L) canvases: the start, then after each step
    renoised_cells: int = 0  # canvas positions re-noised by the verifier, all rounds and examples
    renoise_rounds: int = 0  # verifier rounds that re-noised anything


class _FreeStableConfident(StableAndConfidentStoppingCriteria):
    """transformers' stable-and-confident stopping, with the mean entropy taken over free positions only."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        # The parent's own confidence test is disabled (inf); it keeps the argmax history for stability.
        super().__init__(stability_threshold=stability_threshold, confidence_threshold=math.inf)
        self.free_confidence_threshold = confidence_threshold

    def __call__(self, argmax_canvas, entropy, free_mask=None, **kwargs):
        # The parent's confidence half is disabled (threshold inf), so one logit per position is all it needs.
        stable = super().__call__(argmax_canvas, entropy.new_zeros((*entropy.shape, 1)))
        if free_mask is None:
            free_mask = torch.ones_like(entropy, dtype=torch.bool)
        weights = free_mask.to(entropy.dtype)
        mean_free = (entropy * weights).sum(-1) / weights.sum(-1).clamp(min=1)
        return stable & (mean_free < self.free_confidence_threshold)


def accept_lowest_entropy(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """(B, L) bool: `EntropyBoundSampler.accept_canvas`'s selection from per-position entropies (the k
    lowest-entropy positions with sum - max <= bound)."""
    ordered, order = torch.sort(entropy, dim=-1)
    chosen = torch.cumsum(ordered, dim=-1) - ordered <= entropy_bound
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


def row_generators(seed: int, count: int, device: torch.device | str = "cpu", offset: int = 0) -> list[torch.Generator]:
    """One generator per example, seeded by (seed, example index): results do not depend on batching."""
    gens = []
    for i in range(offset, offset + count):
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + i) % (2**63 - 1))
        gens.append(g)
    return gens


def _as_row_generators(generator, batch: int, device) -> list[torch.Generator]:
    if isinstance(generator, torch.Generator):
        # A single generator seeds one per row: reproducible, but row b then depends on its place in the batch.
        seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device).tolist()
        out = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(s)
            out.append(g)
        return out
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"need one generator per example: got {len(gens)} for a batch of {batch}")
    return gens


def _uniform_tokens(rows: torch.Tensor, length: int, vocab: int, gens: Sequence[torch.Generator], device):
    """(B, L) uniform tokens; rows where `rows` is False are left at 0 and draw nothing from their generator."""
    out = torch.zeros((len(gens), length), dtype=torch.long, device=device)
    for b in torch.nonzero(rows).flatten().tolist():
        out[b] = torch.randint(0, vocab, (length,), generator=gens[b], device=device)
    return out


def _pin_logits(logits: torch.Tensor, pinned: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Pinned positions get 0 on their token and -_PINNED_GAP elsewhere (gather/scatter rather than a one-hot)."""
    index = values[..., None]
    own = logits.gather(-1, index)
    out = logits.masked_fill(pinned[..., None], -_PINNED_GAP)
    return out.scatter(-1, index, torch.where(pinned[..., None], torch.zeros_like(own), own))


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy from log-probabilities, masked (-inf) tokens contributing 0, as torch's Categorical computes it."""
    return -(log_probs.exp() * log_probs.clamp(min=torch.finfo(log_probs.dtype).min)).sum(-1)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` for a uniform in [0, 1): the first token whose cumulative probability exceeds
    it. A zero-probability (masked) token is never returned."""
    cdf = probs.cumsum(-1)
    target = (uniform * cdf[:, -1]).unsqueeze(-1)
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    overflow = token >= probs.shape[-1]  # the target rounded up to the total: take the last possible token
    if overflow.any():
        last = probs.shape[-1] - 1 - probs.flip(-1).gt(0).int().argmax(-1)
        token = torch.where(overflow, last, token)
    return token


@dataclass
class _StepOut:
    sampled: torch.Tensor  # (B, L) a draw from each position's processed distribution
    argmax: torch.Tensor  # (B, L)
    entropy: torch.Tensor  # (B, L) fp32, of the processed distribution
    soft: torch.Tensor  # (B, L, H) the next step's self-conditioning signal


def _process_positions(core, hidden, remaining, temperature, pinned, values, allowed, uniform, chunk) -> _StepOut:
    """Everything over the vocabulary for one step, `chunk` positions at a time: head, temperature, token masks,
    pins, then the draw, argmax, entropy and soft embeddings of the processed distribution."""
    batch, length, width = hidden.shape
    weight, scale = arch.embedding_weight_and_scale(core)
    flat = hidden.reshape(-1, width)
    pinned, values, uniform = pinned.reshape(-1), values.reshape(-1), uniform.reshape(-1)
    rules = allowed.index.reshape(-1) if allowed is not None else None
    n = flat.shape[0]
    sampled = torch.empty(n, dtype=torch.long, device=hidden.device)
    argmax = torch.empty_like(sampled)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    soft = torch.empty(n, weight.shape[1], dtype=weight.dtype, device=hidden.device)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        logits = temperature(None, head_logits(core, flat[a:b]), remaining)
        if rules is not None:
            rule = rules[a:b]
            banned = ~allowed.table[rule.clamp(min=0)] & (rule >= 0)[:, None]
            logits = logits.masked_fill_(banned, -math.inf)
            del banned
        logits = _pin_logits(logits, pinned[a:b], values[a:b])
        argmax[a:b] = logits.argmax(-1)
        log_probs = torch.log_softmax(logits, dim=-1)
        del logits
        entropy[a:b] = _entropy(log_probs)
        probs = log_probs.exp_()  # in place: the log-probabilities are no longer needed
        sampled[a:b] = _inverse_cdf(probs, uniform[a:b])
        soft[a:b] = embed_probabilities(probs, weight, scale)
        del probs, log_probs
    shape = (batch, length)
    return _StepOut(sampled.view(shape), argmax.view(shape), entropy.view(shape), soft.view(batch, length, -1))


def _row_uniforms(rows: torch.Tensor, length: int, gens: Sequence[torch.Generator], device) -> torch.Tensor:
    """(B, L) uniforms for the draws; rows where `rows` is False get 0 and draw nothing from their generator."""
    out = torch.zeros((len(gens), length), dtype=torch.float32, device=device)
    for b in torch.nonzero(rows).flatten().tolist():
        out[b] = torch.rand(length, generator=gens[b], device=device)
    return out


def default_chunk(vocab: int) -> int:
    """Canvas positions per vocabulary-wide chunk (see CHUNK_ELEMENTS)."""
    return max(1, CHUNK_ELEMENTS // vocab)


def _encode_prompt(core, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, canvas_length: int):
    """Run the encoder once over the right-padded prompts: (the KV cache every decoder step reads, the decoder's
    attention mask, the canvas's position ids). The cache holds each row's prompt right-aligned (`PrefixCache`), so
    its sliding-window layers keep that row's last W-1 prompt positions whatever its neighbours' lengths; canvas
    positions continue right after each row's own prompt, as in training (`ftkit.diffusion.loss.decoder_inputs`)."""
    prompt_len = prompt_mask.long().sum(-1)
    cache, decoder_mask, decoder_positions = prefix_cache_inputs(core, prompt_mask, prompt_len, canvas_length)
    positions = torch.arange(prompt_ids.shape[1], device=prompt_ids.device)[None, :].expand_as(prompt_ids)
    arch.encoder(core)(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache, position_ids=positions)
    return cache, decoder_mask, decoder_positions


@dataclass
class _Round:
    canvas: torch.Tensor  # argmax canvas at each row's last step
    steps: torch.Tensor  # (B,) steps run per row
    passes: int


def _denoise_pass(
    core,
    cache,
    decoder_mask,
    decoder_positions,
    start,
    pinned,
    pinned_values,
    running_rows,
    gens,
    *,
    steps,
    temperature_min,
    temperature_max,
    entropy_bound,
    stability_threshold,
    confidence_threshold,
    trajectory,
    allowed,
    chunk,
) -> _Round:
    """One full denoising pass (at most `steps` decoder calls) for the rows in `running_rows`; others are frozen."""
    batch, length = start.shape
    vocab = arch.vocab_size(core)
    device = start.device
    temperature = LinearTemperatureScheduleLogitsProcessor(temperature_min, temperature_max, steps)
    stopper = _FreeStableConfident(stability_threshold, confidence_threshold)

    finished = ~running_rows.clone()
    current = torch.where(pinned, pinned_values, start)
    argmax = current.clone()
    soft = None  # the self-conditioning signal; None on the first step: the decoder zeroes it
    steps_run = torch.zeros(batch, dtype=torch.long, device=device)
    passes = 0
    for remaining in range(steps, 0, -1):
        active = ~finished
        if not active.any():
            break
        steps_run += active.long()
        passes += 1
        with injected_soft_embeddings(core, soft):
            hidden = arch.decoder(core)(
                past_key_values=cache,
                decoder_input_ids=current,
                decoder_attention_mask=decoder_mask,
                decoder_position_ids=decoder_positions,
            ).last_hidden_state
        uniform = _row_uniforms(active, length, gens, device)
        step = _process_positions(core, hidden, remaining, temperature, pinned, pinned_values, allowed, uniform, chunk)
        del hidden
        accepted = accept_lowest_entropy(step.entropy, entropy_bound)
        noise = _uniform_tokens(active, length, vocab, gens, device)
        proposal = torch.where(accepted, step.sampled, noise)
        proposal = torch.where(pinned, pinned_values, proposal)

        # Rows that already stopped keep their canvas, argmax and self-conditioning signal.
        current = torch.where(active[:, None], proposal, current)
        argmax = torch.where(active[:, None], step.argmax, argmax)
        soft = step.soft if soft is None else torch.where(active[:, None, None], step.soft, soft)
        finished |= active & stopper(argmax, step.entropy, free_mask=~pinned)
        if trajectory is not None:
            trajectory.append(current.detach().clone())
    return _Round(canvas=argmax, steps=steps_run, passes=passes)


def _eos_ids(core) -> set[int]:
    eos = arch.eos_token_id(core)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _tokens_per_forward(canvas: torch.Tensor, free: torch.Tensor, steps_used: torch.Tensor, eos_ids: set[int]) -> float:
    """transformers' definition per example (tokens up to and including the first EOS, the fill after it excluded,
    per decoder pass that example needed), counting only free positions: clamped tokens are given, not generated."""
    values = []
    for row, free_row, used in zip(canvas.tolist(), free.tolist(), steps_used.tolist()):
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos_ids), len(row))
        generated = sum(free_row[:end])
        values.append(generated / max(1, used))
    return sum(values) / max(1, len(values))


def _check_schedule(steps: int, temperature_min: float, temperature_max: float) -> None:
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if temperature_max <= 0 or temperature_min < 0 or temperature_min > temperature_max:
        raise ValueError(
            f"need 0 <= temperature_min <= temperature_max and temperature_max > 0, got "
            f"{temperature_min}, {temperature_max}"
        )


def _positions_mask(reported: list[list[int]], like: torch.Tensor) -> torch.Tensor:
    """The verifier's flagged positions per row as a (B, L) mask; positions off the canvas are ignored."""
    mask = torch.zeros_like(like, dtype=torch.bool)
    length = like.shape[-1]
    for b, positions in enumerate(reported):
        for p in positions:
            if 0 <= p < length:
                mask[b, p] = True
    return mask


@torch.no_grad()
def denoise(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    canvas_init: torch.Tensor,
    fixed_mask: torch.Tensor,
    *,
    steps: int,
    temperature_min: float,
    temperature_max: float,
    entropy_bound: float,
    stability_threshold: int,
    confidence_threshold: float,
    generator: torch.Generator | Sequence[torch.Generator],
    clamp: bool = True,
    verifier: Verifier | None = None,
    max_renoise_rounds: int = 2,
    record_trajectory: bool = False,
    allowed: AllowedTokens | None = None,
    chunk: int | None = None,
) -> DenoiseResult:
    """Denoise a batch of canvases given right-padded prompts.

    `canvas_init` supplies the values of fixed positions (other positions are ignored: the canvas starts uniform
    random). `generator` is one generator per example (see `row_generators`; then a batch gives exactly what each
    example gives alone) or a single generator that seeds one per row. `verifier(canvas) -> positions per example`
    enables re-noising rounds (see the module docstring). `allowed` masks each position to the tokens its rule allows
    (`ftkit.diffusion.token_layout.allowed_tokens`). `chunk`: canvas positions per vocabulary-wide chunk (default:
    `default_chunk`); results do not depend on it.
    """
    _check_schedule(steps, temperature_min, temperature_max)
    core = arch.unwrap_model(model)
    device = prompt_ids.device
    batch, length = canvas_init.shape
    vocab = arch.vocab_size(core)
    gens = _as_row_generators(generator, batch, device)
    fixed_mask = fixed_mask.bool().to(device)
    canvas_init = canvas_init.to(device)
    prompt_mask = prompt_mask.to(device)
    if allowed is not None and tuple(allowed.index.shape) != (batch, length):
        raise ValueError(f"allowed.index has shape {tuple(allowed.index.shape)}, the canvas {(batch, length)}")
    knobs = dict(
        steps=steps,
        temperature_min=temperature_min,
        temperature_max=temperature_max,
        entropy_bound=entropy_bound,
        stability_threshold=stability_threshold,
        confidence_threshold=confidence_threshold,
        allowed=None if allowed is None else AllowedTokens(allowed.table.to(device), allowed.index.to(device)),
        chunk=chunk or default_chunk(vocab),
    )

    cache, decoder_mask, decoder_positions = _encode_prompt(core, prompt_ids, prompt_mask, length)
    trajectory: list[torch.Tensor] | None = [] if record_trajectory else None

    everyone = torch.ones(batch, dtype=torch.bool, device=device)
    pinned = fixed_mask if clamp else torch.zeros_like(fixed_mask)
    start = _uniform_tokens(everyone, length, vocab, gens, device)
    if trajectory is not None:
        trajectory.append(torch.where(pinned, canvas_init, start))
    result = _denoise_pass(
        core,
        cache,
        decoder_mask,
        decoder_positions,
        start,
        pinned,
        canvas_init,
        everyone,
        gens,
        trajectory=trajectory,
        **knobs,
    )
    canvas, steps_used, passes = result.canvas, result.steps.clone(), result.passes

    renoised_cells, rounds = 0, 0
    # Without clamping, a "fixed" position may hold a wrong token, so the verifier may re-noise it too.
    renoisable = ~fixed_mask if clamp else torch.ones_like(fixed_mask)
    for _ in range(max_renoise_rounds if verifier is not None else 0):
        renoise = _positions_mask(verifier(canvas), fixed_mask) & renoisable
        rows = renoise.any(-1)
        if not rows.any():
            break
        rounds += 1
        renoised_cells += int(renoise.sum())
        noise = _uniform_tokens(rows, length, vocab, gens, device)
        start = torch.where(renoise, noise, canvas)
        if trajectory is not None:
            trajectory.append(start.clone())
        # Everything but the re-noised positions is pinned to the current answer for this round.
        result = _denoise_pass(
            core,
            cache,
            decoder_mask,
            decoder_positions,
            start,
            ~renoise,
            canvas,
            rows,
            gens,
            trajectory=trajectory,
            **knobs,
        )
        canvas = torch.where(rows[:, None], result.canvas, canvas)
        steps_used += result.steps
        passes += result.passes

    return DenoiseResult(
        canvas=canvas,
        steps_used=steps_used,
        forward_passes=passes,
        tokens_per_forward=_tokens_per_forward(canvas, ~fixed_mask, steps_used, _eos_ids(core)),
        trajectory=trajectory or [],
        renoised_cells=renoised_cells,
        renoise_rounds=rounds,
    )
