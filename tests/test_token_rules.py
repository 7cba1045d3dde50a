"""Per-position token rules (constrained decoding): what layouts allow where, and their tensor form."""

from __future__ import annotations

import pytest
import torch

from ftkit.diffusion.token_layout import TokenRule, allowed_tokens, layout_example, stop_token_ids, tokens_made_of
from ftkit.errors import FtkitError
from ftkit.tasks import make_task
from ftkit.tasks.base import Piece, PromptCanvas


def _ids(tok, chars: str) -> frozenset[int]:
    return frozenset(tok.convert_tokens_to_ids(list(chars)))


def test_sudoku_cells_take_digits_separators_are_fixed_and_the_fill_stops(char_tokenizer):
    task = make_task("sudoku", {"rows_on_lines": True})
    ex = task.build_dataset("test", 1, seed=0)[0]
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 512)
    digits = TokenRule(_ids(char_tokenizer, "123456789"))
    cells = lay.content_length - 1  # the 81 cells and 8 newlines; then the end-of-turn token
    assert cells == 89
    for p in range(cells):
        if lay.fixed[p]:  # givens and the newlines between rows
            assert lay.allowed[p] is None
        else:
            assert lay.allowed[p] == digits
    # The end-of-turn position and the fill: a stop token (end of turn or EOS) and nothing else.
    assert lay.allowed[cells:] == [TokenRule(frozenset(stop_token_ids(char_tokenizer)))] * (96 - 89)


def test_free_text_cannot_stop_before_the_last_fixed_piece(char_tokenizer):
    stops = frozenset(stop_token_ids(char_tokenizer))
    specials = frozenset(char_tokenizer.all_special_ids) | stops
    pc = PromptCanvas(
        "p",
        (Piece("def f():\n", True), Piece("    x = 1\n", False), Piece("    return x\n", True), Piece("# tail", False)),
    )
    lay = layout_example(char_tokenizer, pc, 64, 512)
    middle = lay.allowed[9:19]
    tail = lay.allowed[32:38]
    assert set(middle) == {TokenRule(specials, exclude=True)}  # EOS (and pad, bos...) ruled out
    assert set(tail) == {TokenRule(specials - stops, exclude=True)}  # after the last fixed piece it may end
    assert lay.allowed[:9] == [None] * 9 and lay.allowed[19:32] == [None] * 13 and lay.content_length == 39


def test_protein_span_takes_residues_only(char_tokenizer):
    task = make_task("protein", {"mode": "scaffold"})
    ex = task.build_dataset("test", 1, seed=0)[0]
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 112, 512)
    residues = TokenRule(_ids(char_tokenizer, "ACDEFGHIKLMNPQRSTVWY"))
    free = [lay.allowed[p] for p in range(lay.content_length - 1) if not lay.fixed[p]]  # before the end of turn
    assert free and set(free) == {residues}  # no EOS inside the sequence, even after the last motif


def test_tokens_made_of_takes_multi_character_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "1": 2, "2": 3, "12": 4, "a1": 5, " 1": 6, "a": 7}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    assert tokens_made_of(tok, "123") == {2, 3, 4}  # "a1" and " 1" hold other characters; specials never count
    with pytest.raises(FtkitError, match="allowed characters 'xyz'"):
        tokens_made_of(tok, "xyz")


def test_allowed_tokens_batches_distinct_rules_once(char_tokenizer):
    task = make_task("sudoku")
    examples = task.build_dataset("test", 3, seed=0)
    layouts = [layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 512) for ex in examples]
    allowed = allowed_tokens(layouts, len(char_tokenizer))
    assert allowed.table.shape == (2, len(char_tokenizer))  # digits, stop tokens: shared by every example
    for b, lay in enumerate(layouts):
        for p, rule in enumerate(lay.allowed):
            s = int(allowed.index[b, p])
            if rule is None:
                assert s == -1
            else:
                assert set(torch.nonzero(allowed.table[s]).flatten().tolist()) == set(rule.ids)
    nothing = TokenRule(frozenset({10_000}))  # outside the model's vocabulary
    bad = [layouts[0].__class__(**{**layouts[0].__dict__, "allowed": [nothing] * 96})]
    with pytest.raises(FtkitError, match="allows no token"):
        allowed_tokens(bad, len(char_tokenizer))
    no_rules = [layouts[0].__class__(**{**layouts[0].__dict__, "allowed": []})]
    assert allowed_tokens(no_rules, len(char_tokenizer)) is None


def test_open_ended_answers_may_run_on_and_blocks_slice_the_rules(char_tokenizer):
    """A multi-block layout's answer is open-ended: past its pieces any text token or a stop may come (a one-block
    layout would force stops there); `allowed_tokens(block=k)` takes block k's rules."""
    stops = frozenset(stop_token_ids(char_tokenizer))
    specials = frozenset(char_tokenizer.all_special_ids) | stops
    pc = PromptCanvas("p", (Piece("ab", True), Piece("c" * 30, False)))
    one = layout_example(char_tokenizer, pc, 16, 512, max_blocks=None)
    assert one.num_blocks == 3 and len(one.allowed) == 48
    assert set(one.allowed[32:]) == {TokenRule(specials - stops, exclude=True)}
    closed = layout_example(char_tokenizer, PromptCanvas("p", (Piece("ab", True), Piece("cd", False))), 16, 512)
    assert set(closed.allowed[4:]) == {TokenRule(stops)}
    allowed = allowed_tokens([one], len(char_tokenizer), block=2)
    assert allowed.index.shape == (1, 16) and (allowed.index >= 0).all()
    assert allowed.table[0, sorted(stops)].all()  # stops are allowed past the pieces
    assert allowed_tokens([one], len(char_tokenizer), block=3) is None  # past the laid-out blocks: no rules
