"""Verifier-guided sampling: the task's checker, turned into the canvas positions `denoise` re-noises.

`task.check` flags characters of the decoded answer; `flagged_tokens` maps them to canvas token indices through the
output's own tokens. `make_verifier` / `rows_verifier` wrap that as the verifier `denoise` / `denoise_blocks` call
after each pass, at most MAX_RENOISE_ROUNDS times per batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from ftkit.diffusion.token_layout import canvas_to_text, stop_token_ids
from ftkit.tasks.base import Example

MAX_RENOISE_ROUNDS = 2  # verifier rounds per batch; each round may spend the full `steps` budget again


def _token_char_starts(tokenizer, row: list[int], stop_ids) -> tuple[list[int], int, int]:
    """(first character offset of each token before the first stop token, that stop's index, decoded text length).

    Built from the *output* tokens, decoded one by one as `layout` does for the reference: with a subword tokenizer
    a wrong answer may tokenize differently from the reference, so the reference's char_starts would misplace it."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(row) if t in stops), len(row))
    starts, pos = [], 0
    for tid in row[:end]:
        starts.append(pos)
        pos += len(tokenizer.decode([tid], skip_special_tokens=True))
    return starts, end, pos


def char_positions_to_tokens(positions, starts: list[int], end: int, text_length: int, canvas_length: int) -> list[int]:
    """Canvas token indices holding the given character offsets. Offsets past the decoded text (a checker padding a
    short output) map to the positions from the first stop token on, one per character."""
    tokens = set()
    for c in positions:
        if c >= text_length:
            t = end + (c - text_length)
        else:
            t = bisect.bisect_right(starts, c) - 1
        if 0 <= t < canvas_length:
            tokens.add(t)
    return sorted(tokens)


def flagged_tokens(tokenizer, task, example: Example, row: list[int], stops) -> tuple[list[int], bool]:
    """(canvas token indices of the characters `task.check` flags in the decoded row, whether some violation has no
    positions: a global one such as "unparsable", which no token list can express)."""
    violations = task.check(example, canvas_to_text(tokenizer, row))
    chars = {p for v in violations for p in v.positions}
    starts, end, length = _token_char_starts(tokenizer, row, stops)
    return char_positions_to_tokens(chars, starts, end, length, len(row)), any(not v.positions for v in violations)


def make_verifier(tokenizer, task, examples: list[Example]) -> Callable[[torch.Tensor], list[list[int]]]:
    """A `denoise` verifier: decode each canvas, run task.check, map the violations' characters to tokens."""

    stops = stop_token_ids(tokenizer)

    def verify(canvas: torch.Tensor) -> list[list[int]]:
        return [flagged_tokens(tokenizer, task, ex, row, stops)[0] for ex, row in zip(examples, canvas.tolist())]

    return verify


def rows_verifier(tokenizer, task, examples: list[Example]) -> Callable[[list[int], torch.Tensor], list[list[int]]]:
    """`make_verifier` for `denoise_blocks`, which names the rows (indices into `examples`) it asks about."""

    def verify(rows: list[int], answers: torch.Tensor) -> list[list[int]]:
        return make_verifier(tokenizer, task, [examples[r] for r in rows])(answers)

    return verify
