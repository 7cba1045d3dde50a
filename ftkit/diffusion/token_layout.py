"""Text -> token layout: an example's prompt and canvas as ids, with the canvas's fixed-position mask.

The chat format is DiffusionGemma's own: the encoder prompt is the chat template's rendering of the conversation
up to the model's turn (`<bos><|turn>user\n...<turn|>\n<|turn>model\n`), and the canvas is the assistant content
followed by the token the template closes the turn with (`<turn|>`), EOS-filled after it, as TRL's training
template supervises it. The model learns to stop where it stops at generation time.

Pieces are tokenized one by one and concatenated, so a fixed piece (a Sudoku given, a code prefix) maps to exact
token positions that the sampler can clamp, whichever tokenizer is in use. The EOS fill is supervised, as in the
reference objective.

Each canvas position also gets a `TokenRule`, the tokens the sampler may put there (constrained decoding):
- a free piece that declares `allowed` characters: only tokens made of those characters (Sudoku digits, residues);
- any other free position: any text token, with the stop tokens (`stop_token_ids`) ruled out before the last fixed
  piece, so the text cannot end before content that is given (a Sudoku's last givens, a code suffix);
- past the pieces (the end-of-turn position and the fill): stop tokens only, so the decoded text has exactly the
  layout's length -- for an answer laid out at its length (a one-block task). A multi-block task's answer is
  open-ended: there the positions past the pieces take any text token or a stop;
- fixed positions: no rule (the sampler pins them).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

from ftkit.errors import FtkitError
from ftkit.tasks.base import PromptCanvas


@dataclass(frozen=True)
class TokenRule:
    """The tokens one canvas position may hold: exactly `ids`, or with `exclude` any token but `ids`."""

    ids: frozenset[int]
    exclude: bool = False


@dataclass(frozen=True)
class TokenLayout:
    prompt_ids: list[int]
    # The response, EOS-filled to whole blocks of `canvas_length` (one block, i.e. the canvas, for most tasks).
    canvas_ids: list[int]
    fixed: list[bool]  # per canvas position: clamped during sampling
    content_length: int  # response tokens before the EOS fill (the end-of-turn token included)
    char_starts: list[int]  # per token of the pieces: its first character's offset in the canvas text
    canvas_length: int | None = None  # the model's canvas (block) length; None: one block of len(canvas_ids)
    # Per canvas position (all blocks): the tokens the sampler may put there (None: any); empty: no rules at all.
    allowed: list[TokenRule | None] = field(default_factory=list)

    @property
    def block_length(self) -> int:
        return self.canvas_length or len(self.canvas_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.canvas_ids) // self.block_length

    def block(self, k: int) -> tuple[list[int], list[bool]]:
        """Block k's canvas ids and fixed mask (block_length each)."""
        a, b = k * self.block_length, (k + 1) * self.block_length
        return self.canvas_ids[a:b], self.fixed[a:b]

    def block_rules(self, k: int) -> list[TokenRule | None]:
        """Block k's token rules (none past the laid-out blocks: an open-ended answer may run on)."""
        a, b = k * self.block_length, (k + 1) * self.block_length
        return self.allowed[a:b]


@dataclass(frozen=True)
class AllowedTokens:
    """A batch's token rules as tensors, for the sampler: `table[s]` is rule s as a (vocab,) bool mask and
    `index[b, p]` the rule of position p of example b (-1: any token). A handful of distinct rules serve the whole
    batch, so no (batch, canvas, vocab) mask is ever built."""

    table: torch.Tensor  # (rules, vocab) bool
    index: torch.Tensor  # (batch, canvas) long


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


_PROBE = "ftkit-probe"
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_id(tokenizer) -> int | None:
    """The token the tokenizer's chat template closes an assistant turn with (`<turn|>` for DiffusionGemma, Gemma 4):
    the canvas ends with it and generation stops on it. Read off the template by rendering one exchange, so any
    chat template works; None for a tokenizer without one (the canvas then ends at the EOS fill)."""
    if tokenizer in _END_OF_TURN:
        return _END_OF_TURN[tokenizer]
    found = None
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _PROBE}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        tail = _encode(tokenizer, text[text.rindex(_PROBE) + len(_PROBE) :])
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        if tail and tail[0] in special:
            found = int(tail[0])
    _END_OF_TURN[tokenizer] = found
    return found


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end an answer: the chat template's end-of-turn token, then EOS. Decoding, the block loop and
    the sampler's constraints all stop at the first of them."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


@functools.lru_cache(maxsize=16)
def _special_ids(tokenizer) -> frozenset[int]:
    return frozenset(tokenizer.all_special_ids) | frozenset(stop_token_ids(tokenizer))


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


def _position_rules(
    tokenizer, pieces, piece_lengths: list[int], length: int, open_ended: bool
) -> list[TokenRule | None]:
    """One rule per position of a `length`-token response (see the module docstring)."""
    specials = _special_ids(tokenizer)
    stops = frozenset(stop_token_ids(tokenizer))
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
    past = any_text_or_stop if open_ended else TokenRule(stops)
    return rules + [past] * (length - len(rules))


def encode_prompt(tokenizer, prompt: str, messages: tuple[tuple[str, str], ...] = ()) -> list[int]:
    """The encoder prompt: the chat template's rendering of the conversation (`messages`, else one user turn holding
    `prompt`) up to the model's turn. A tokenizer without a chat template gets BOS + the text."""
    chat = [{"role": role, "content": content} for role, content in messages] or [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _encode(tokenizer, "\n".join(turn["content"] for turn in chat))


def task_max_blocks(task) -> int | None:
    """How many canvases a task's answer may span: any number (None) for a task with `multi_block = True`, else 1."""
    return None if getattr(task, "multi_block", False) else 1


def layout_example(
    tokenizer,
    pc: PromptCanvas,
    canvas_length: int,
    max_prompt_length: int,
    example_id: str = "?",
    max_blocks: int | None = 1,
    token_rules: bool = True,
) -> TokenLayout:
    """Tokenize an example. A response longer than one canvas is an error unless `max_blocks` allows more blocks
    (None: any number; a task opts in with `multi_block = True`). A one-block layout fixes the answer's length
    (its token rules end the text where the pieces end); with more blocks allowed the answer is open-ended.
    `token_rules=False` leaves `allowed` empty (training has no use for the sampler's rules)."""
    prompt_ids = encode_prompt(tokenizer, pc.prompt, pc.messages)
    if len(prompt_ids) > max_prompt_length:
        raise FtkitError(
            f"example {example_id}: prompt is {len(prompt_ids)} tokens, "
            f"over train.max_prompt_length={max_prompt_length}"
        )
    canvas, fixed, starts, offset = [], [], [], 0
    # One tokenizer call for all pieces and one decode call for all tokens (a Sudoku has 81 pieces).
    texts = [piece.text for piece in pc.pieces]
    piece_ids = tokenizer(texts, add_special_tokens=False).input_ids if any(texts) else [[] for _ in texts]
    widths = iter(len(t) for t in tokenizer.batch_decode([[tid] for ids in piece_ids for tid in ids]))
    for piece, ids in zip(pc.pieces, piece_ids):
        # Character starts per token, for mapping a checker's character positions back to tokens.
        pos = offset
        for _ in ids:
            starts.append(pos)
            pos += next(widths)
        canvas.extend(ids)
        fixed.extend([piece.fixed] * len(ids))
        offset += len(piece.text)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        canvas.append(eot)  # generated, not given: the model learns where its answer ends
        fixed.append(False)
    blocks = max(1, -(-len(canvas) // canvas_length))
    if max_blocks is not None and blocks > max_blocks:
        closing = " (its end-of-turn token included)" if eot is not None else ""
        limit = "the model's" if max_blocks == 1 else f"{max_blocks} blocks of the model's"
        raise FtkitError(
            f"example {example_id}: canvas is {len(canvas)} tokens{closing}, longer than {limit} "
            f"canvas_length={canvas_length}"
        )
    content = len(canvas)
    pad = blocks * canvas_length - content
    return TokenLayout(
        prompt_ids=prompt_ids,
        canvas_ids=canvas + [tokenizer.eos_token_id] * pad,
        fixed=fixed + [False] * pad,
        content_length=content,
        char_starts=starts,
        canvas_length=canvas_length,
        allowed=_position_rules(
            tokenizer, pc.pieces, [len(ids) for ids in piece_ids], blocks * canvas_length, open_ended=max_blocks != 1
        )
        if token_rules
        else [],
    )


def allowed_tokens(layouts: list[TokenLayout], vocab_size: int, device=None, block: int = 0) -> AllowedTokens | None:
    """Block `block`'s token rules of a batch, for the sampler (`denoise(allowed=...)`); None when no position has
    a rule."""
    rules: dict[TokenRule, int] = {}
    width = layouts[0].block_length
    index = torch.full((len(layouts), width), -1, dtype=torch.long)
    for b, lay in enumerate(layouts):
        for p, rule in enumerate(lay.block_rules(block)):
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


def collate(layouts: list[TokenLayout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for the diffusion loss:

    - `input_ids` = prompt + the response's real tokens (content and end-of-turn, no EOS fill): the encoder reads it
      all, and its autoregressive co-loss covers exactly these tokens;
    - `prompt_len` marks where the response starts;
    - `canvas` (B, K, L): the clean canvas of each response block, EOS-filled past the response; K is the batch's
      most blocks, and an example's blocks past its last hold padding (never chosen: the loss counts an example's
      blocks from its response length);
    - `fixed` (B, K, L): the clamped positions, block by block."""
    length = layouts[0].block_length
    if any(lay.block_length != length for lay in layouts):
        raise ValueError("collate: layouts of different canvas lengths")
    seqs = [lay.prompt_ids + lay.canvas_ids[: lay.content_length] for lay in layouts]
    width = max(len(seq) for seq in seqs)
    input_ids = torch.full((len(layouts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(layouts), width), dtype=torch.long)
    blocks = max(lay.num_blocks for lay in layouts)
    canvas = torch.full((len(layouts), blocks * length), pad_id, dtype=torch.long)
    fixed = torch.zeros((len(layouts), blocks * length), dtype=torch.bool)
    for i, (lay, seq) in enumerate(zip(layouts, seqs)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        canvas[i, : len(lay.canvas_ids)] = torch.tensor(lay.canvas_ids, dtype=torch.long)
        fixed[i, : len(lay.fixed)] = torch.tensor(lay.fixed, dtype=torch.bool)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "prompt_len": torch.tensor([len(lay.prompt_ids) for lay in layouts], dtype=torch.long),
        "canvas": canvas.view(len(layouts), blocks, length),
        "fixed": fixed.view(len(layouts), blocks, length),
    }


def canvas_to_text(tokenizer, canvas_ids: list[int]) -> str:
    """Decode a canvas (or a multi-block answer) up to its first stop token (end of turn or EOS)."""
    stops = set(stop_token_ids(tokenizer))
    ids = list(canvas_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)
