"""Answers longer than one canvas: denoise block after block, each block one call of `denoise()`.

DiffusionGemma generates a long answer as consecutive canvases. Once a block is denoised it is clean context: the
encoder reads prompt + finished blocks (so the finished block extends the prompt's KV cache), the next canvas's
positions continue after it, and the loop goes on until a block holds a stop token (end of turn or EOS) or
`max_new_tokens` is reached. This is what training sees for block k (`ftkit.diffusion.loss.choose_blocks`): the
cache cut at the block's start (right-aligned per row, so the sliding-window layers see the same W-1 positions in
both: `prefix_cache.py`), positions from there.

`denoise()` encodes its prompt itself, so block k passes prompt + blocks 0..k-1 as the prompt: the encoder is
causal, so that cache equals the previous one extended by the finished block (re-encoding costs one encoder pass
per block, small next to the decoder's steps). For an answer that fits one block the loop makes exactly the call
generation made before it existed, with the same per-example generators, so one-block outputs are unchanged.

Rows of a batch finish at different blocks; each block's call carries only the rows still running, each with its
own generator (so a row's answer does not depend on its batch neighbours).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ftkit.diffusion.sample import denoise
from ftkit.diffusion.token_layout import allowed_tokens

# (indices of the rows judged, their full answers so far (n, (k+1) * L)) -> per row, token positions to re-noise
RowsVerifier = Callable[[list[int], torch.Tensor], list[list[int]]]


@dataclass
class BlocksResult:
    tokens: list[list[int]]  # per row: the generated tokens of all its blocks, cut at its token budget
    steps_used: list[int]  # per row: decoder passes over all blocks (re-noising rounds included)
    forward_passes: int  # batched decoder calls, all blocks
    tokens_per_forward: float  # mean over rows: free tokens up to and including the first stop, per decoder pass
    renoised_cells: int
    blocks: list[int]  # per row: how many blocks it denoised
    # Per block: the rows it ran (indices into the batch) and denoise's trajectory for them (record_trajectory).
    block_rows: list[list[int]] = field(default_factory=list)
    trajectories: list[list[torch.Tensor]] = field(default_factory=list)


def _fixed_end(layout) -> int:
    """One past the last fixed position of the answer (0 when nothing is fixed)."""
    return max((i + 1 for i, f in enumerate(layout.fixed) if f), default=0)


def block_budget(layout, max_new_tokens: int) -> int:
    """Blocks a row may denoise: enough for `max_new_tokens`, and never fewer than its fixed pieces need."""
    length = layout.block_length
    return max(1, -(-max_new_tokens // length), -(-_fixed_end(layout) // length))


def _block_inputs(layouts, rows: list[int], answers: list[list[int]], k: int, pad_id: int, device):
    """Prompt (+ finished blocks) right-padded, and block k's fixed tokens (padding elsewhere, so nothing of a
    reference answer reaches the sampler)."""
    length = layouts[rows[0]].block_length
    prompts = [layouts[r].prompt_ids + answers[r] for r in rows]
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)
    canvas_init = torch.full((len(rows), length), pad_id, dtype=torch.long)
    fixed = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        prompt_ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, : len(p)] = 1
        if k < layouts[r].num_blocks:
            ids, mask = layouts[r].block(k)
            fixed[i] = torch.tensor(mask, dtype=torch.bool)
            canvas_init[i] = torch.where(fixed[i], torch.tensor(ids, dtype=torch.long), canvas_init[i])
    return prompt_ids.to(device), prompt_mask.to(device), canvas_init.to(device), fixed.to(device)


def _block_verifier(
    verifier: RowsVerifier, rows: list[int], answers, k: int, length: int, stops: set[int], budgets: list[int]
):
    """`denoise`'s verifier for block k: judges a row only when this block ends its answer (a stop token, or its
    last allowed block): an unfinished answer is not wrong yet. Positions outside the block are dropped."""

    def verify(canvas: torch.Tensor) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in rows]
        ends = [
            i for i, (r, row) in enumerate(zip(rows, canvas.tolist())) if stops.intersection(row) or k + 1 >= budgets[r]
        ]
        if not ends:
            return out
        previous = torch.tensor([answers[rows[i]] for i in ends], dtype=torch.long, device=canvas.device)
        full = torch.cat([previous.view(len(ends), k * length), canvas[ends]], dim=1)
        for i, positions in zip(ends, verifier([rows[i] for i in ends], full)):
            out[i] = [p - k * length for p in positions if k * length <= p < (k + 1) * length]
        return out

    return verify


def _tokens_per_forward(layouts, answers, steps_used, stops: set[int]) -> float:
    """Per row: free tokens up to and including the first stop token, per decoder pass; the mean over rows."""
    values = []
    for lay, tokens, used in zip(layouts, answers, steps_used):
        end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        given = sum(1 for i in range(min(end, len(lay.fixed))) if lay.fixed[i])
        values.append((end - given) / max(1, used))
    return sum(values) / max(1, len(values))


def denoise_blocks(
    model,
    layouts: Sequence,
    *,
    generators: Sequence[torch.Generator],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    verifier: RowsVerifier | None = None,
    vocab_size: int | None = None,
    on_block: Callable[[int, list[int], torch.Tensor, list[bool]], None] | None = None,
    sampler: Callable = denoise,
    **sampling,
) -> BlocksResult:
    """Generate the answers of `layouts` (ftkit.diffusion.token_layout.TokenLayout: prompt, fixed pieces, block
    length) block by block.

    `generators`: one per row (see `row_generators`), carried from block to block. `sampling`: `denoise`'s keyword
    arguments (steps, schedule, clamp, max_renoise_rounds, record_trajectory...), passed through unchanged.
    `verifier(rows, answers)` judges whole answers (see `_block_verifier`). `vocab_size`: mask each position of a
    block to the tokens its layout allows there (`TokenLayout.allowed`, constrained decoding); None: no masks.
    `on_block(k, rows, canvas, last)` is called as each block lands (`last`: per row, whether this block ends its
    answer). A row stops after a block that holds a stop token (unless fixed pieces lie beyond it) or at its budget
    (`block_budget`)."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if len(generators) != len(layouts):
        raise ValueError(f"need one generator per example: got {len(generators)} for {len(layouts)}")
    device = next(model.parameters()).device
    stops = set(stop_ids)
    length = layouts[0].block_length
    budgets = [block_budget(lay, max_new_tokens) for lay in layouts]
    answers: list[list[int]] = [[] for _ in layouts]
    steps_used = [0] * len(layouts)
    done = [False] * len(layouts)
    result = BlocksResult(
        tokens=[],
        steps_used=steps_used,
        forward_passes=0,
        tokens_per_forward=0.0,
        renoised_cells=0,
        blocks=[0] * len(layouts),
    )
    k = 0
    while True:
        rows = [r for r in range(len(layouts)) if not done[r] and k < budgets[r]]
        if not rows:
            break
        prompt_ids, prompt_mask, canvas_init, fixed = _block_inputs(layouts, rows, answers, k, pad_id, device)
        block_verify = _block_verifier(verifier, rows, answers, k, length, stops, budgets) if verifier else None
        out = sampler(
            model=model,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            canvas_init=canvas_init,
            fixed_mask=fixed,
            generator=[generators[r] for r in rows],
            verifier=block_verify,
            allowed=allowed_tokens([layouts[r] for r in rows], vocab_size, device, block=k) if vocab_size else None,
            **sampling,
        )
        for i, r in enumerate(rows):
            block = out.canvas[i].tolist()
            answers[r].extend(block)
            steps_used[r] += int(out.steps_used[i])
            result.blocks[r] += 1
            # A stop token ends the answer, unless fixed pieces come after this block (they are part of it).
            if stops.intersection(block) and _fixed_end(layouts[r]) <= (k + 1) * length:
                done[r] = True
        result.forward_passes += int(out.forward_passes)
        result.renoised_cells += int(out.renoised_cells)
        result.block_rows.append(rows)
        result.trajectories.append(list(out.trajectory))
        if on_block is not None:
            on_block(k, rows, out.canvas, [done[r] or k + 1 >= budgets[r] for r in rows])
        k += 1
    result.tokens = [tokens[: max(max_new_tokens, _fixed_end(lay))] for tokens, lay in zip(answers, layouts)]
    result.tokens_per_forward = _tokens_per_forward(layouts, result.tokens, steps_used, stops)
    return result
