"""Text -> token layout: an example's prompt and canvas as ids, with the canvas's fixed-position mask.

Pieces are tokenized one by one and concatenated, so a fixed piece (a Sudoku given, a code prefix) maps to exact
token positions that the sampler can clamp, whichever tokenizer is in use. The canvas is EOS-filled past its
end, as the reference objective does; the fill is supervised.

Each canvas position also gets a `TokenRule`, the tokens the sampler may put there (constrained decoding):
- a free piece that declares `allowed` characters: only tokens made of those characters (Sudoku digits, residues);
- any other free position: any text token, with the stop tokens (`stop_token_ids`) ruled out before the last fixed
  piece, so the text cannot end before content that is given (a Sudoku's last givens, a code suffix);
- the fill past the content: stop tokens only, so the decoded text has exactly the layout's length;
- fixed positions: no rule (the sampler pins them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ftkit.errors import FtkitError
from ftkit.tasks.base import PromptCanvas

# End-of-turn tokens of Gemma chat templates: when the tokenizer has one, it ends a canvas's text as EOS does.
END_OF_TURN_TOKENS = ("<turn|>", "<end_of_turn>")


@dataclass(frozen=True)
class TokenRule:
    """The tokens one canvas position may hold: exactly `ids`, or with `exclude` any token but `ids`."""

    ids: frozenset[int]
    exclude: bool = False


@dataclass(frozen=True)
class Layout:
    prompt_ids: list[int]
    canvas_ids: list[int]  # length == canvas_length, EOS-filled
    fixed: list[bool]  # per canvas position: clamped during sampling
    content_length: int  # canvas positions before the EOS fill
    char_starts: list[int]  # per content token: its first character's offset in the canvas text
    # Per canvas position: the tokens the sampler may put there (None: any); empty: no rules at all.
    allowed: list[TokenRule | None] = field(default_factory=list)


@dataclass(frozen=True)
class AllowedTokens:
    """A batch's token rules as tensors, for the sampler: `table[s]` is rule s as a (vocab,) bool mask and
    `index[b, p]` the rule of position p of example b (-1: any token). A handful of distinct rules serve the whole
    batch, so no (batch, canvas, vocab) mask is ever built."""

    table: torch.Tensor  # (rules, vocab) bool
    index: torch.Tensor  # (batch, canvas) long


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The tokens that end a canvas's text: EOS, and the chat template's end-of-turn token when the tokenizer has
    one. The one place that says what "stop" means for layouts and the sampler's rules."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab)
    return frozenset(ids)


@functools.lru_cache(maxsize=16)
def _special_ids(tokenizer) -> frozenset[int]:
    return frozenset(tokenizer.all_special_ids) | stop_token_ids(tokenizer)


@functools.lru_cache(maxsize=16)
def tokens_made_of(tokenizer, chars: str) -> frozenset[int]:
    """Ids of the (non-special) tokens whose text is non-empty and made only of `chars`: the character tokenizer's
    single characters, and with a subword vocabulary also their multi-character tokens ("12", "MKT")."""
    allowed = set(chars)
    specials = _special_ids(tokenizer)
    ids = [i for i in range(len(tokenizer)) if i not in specials]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    found = frozenset(i for i, text in zip(ids, texts) if text and set(text) <= allowed)
    if not found:
        raise FtkitError(f"no token of this tokenizer is made of the allowed characters {chars!r}")
    return found


def _position_rules(tokenizer, pieces, piece_lengths: list[int], canvas_length: int) -> list[TokenRule | None]:
    specials = _special_ids(tokenizer)
    stops = stop_token_ids(tokenizer)
    any_text = TokenRule(specials, exclude=True)  # may not end the text here
    any_text_or_stop = TokenRule(specials - stops, exclude=True)
    ends = [sum(piece_lengths[: k + 1]) for k in range(len(pieces))]
    last_fixed_end = max((end for piece, end in zip(pieces, ends) if piece.fixed), default=0)
    rules: list[TokenRule | None] = []
    for piece, n in zip(pieces, piece_lengths):
        for _ in range(n):
            if piece.fixed:
                rules.append(None)
            elif piece.allowed is not None:
                rules.append(TokenRule(tokens_made_of(tokenizer, piece.allowed)))
            else:
                rules.append(any_text if len(rules) < last_fixed_end else any_text_or_stop)
    return rules + [TokenRule(stops)] * (canvas_length - len(rules))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Chat-templated prompt for an instruction-tuned tokenizer, else BOS + text (the tiny tokenizer)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _encode(tokenizer, prompt)


def layout_example(tokenizer, pc: PromptCanvas, canvas_length: int, max_prompt_length: int, example_id: str = "?") -> Layout:
    prompt_ids = encode_prompt(tokenizer, pc.prompt)
    if len(prompt_ids) > max_prompt_length:
        raise FtkitError(
            f"example {example_id}: prompt is {len(prompt_ids)} tokens, over train.max_prompt_length={max_prompt_length}"
        )
    canvas, fixed, starts, offset, lengths = [], [], [], 0, []
    for piece in pc.pieces:
        ids = _encode(tokenizer, piece.text)
        lengths.append(len(ids))
        # Character starts per token, for mapping a checker's character positions back to tokens.
        pos = offset
        for tid in ids:
            starts.append(pos)
            pos += len(tokenizer.decode([tid]))
        canvas.extend(ids)
        fixed.extend([piece.fixed] * len(ids))
        offset += len(piece.text)
    if len(canvas) > canvas_length:
        raise FtkitError(
            f"example {example_id}: canvas is {len(canvas)} tokens, longer than the model's canvas_length={canvas_length}"
        )
    content = len(canvas)
    pad = canvas_length - content
    return Layout(
        prompt_ids=prompt_ids,
        canvas_ids=canvas + [tokenizer.eos_token_id] * pad,
        fixed=fixed + [False] * pad,
        content_length=content,
        char_starts=starts,
        allowed=_position_rules(tokenizer, pc.pieces, lengths, canvas_length),
    )


def allowed_tokens(layouts: list[Layout], vocab_size: int, device=None) -> AllowedTokens | None:
    """The batch's token rules for the sampler (`denoise(allowed=...)`); None when no position has a rule."""
    rules: dict[TokenRule, int] = {}
    width = max(len(lay.canvas_ids) for lay in layouts)
    index = torch.full((len(layouts), width), -1, dtype=torch.long)
    for b, lay in enumerate(layouts):
        for p, rule in enumerate(lay.allowed):
            if rule is not None:
                index[b, p] = rules.setdefault(rule, len(rules))
    if not rules:
        return None
    table = torch.zeros((len(rules), vocab_size), dtype=torch.bool)
    for rule, s in rules.items():
        ids = torch.tensor(sorted(i for i in rule.ids if 0 <= i < vocab_size), dtype=torch.long)
        table[s] = rule.exclude
        table[s, ids] = not rule.exclude
        if not table[s].any():
            raise FtkitError(f"a canvas position allows no token of the model's {vocab_size}-token vocabulary")
    return AllowedTokens(table.to(device), index.to(device))


def collate(layouts: list[Layout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: `input_ids` = prompt + clean canvas (the encoder reads it all for its AR co-loss),
    `prompt_len` marks where the canvas starts; `canvas` is the clean target."""
    lengths = [len(lay.prompt_ids) + len(lay.canvas_ids) for lay in layouts]
    width = max(lengths)
    input_ids = torch.full((len(layouts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(layouts), width), dtype=torch.long)
    for i, lay in enumerate(layouts):
        seq = lay.prompt_ids + lay.canvas_ids
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_len": torch.tensor([len(lay.prompt_ids) for lay in layouts], dtype=torch.long),
        "canvas": torch.tensor([lay.canvas_ids for lay in layouts], dtype=torch.long),
        "fixed": torch.tensor([lay.fixed for lay in layouts], dtype=torch.bool),
    }


def canvas_to_text(tokenizer, canvas_ids: list[int]) -> str:
    """Decode a canvas up to its first EOS."""
    eos = tokenizer.eos_token_id
    ids = list(canvas_ids)
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
