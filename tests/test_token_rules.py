"""Per-position token rules (constrained decoding): what layouts allow where, and their tensor form."""

from __future__ import annotations

import pytest
import torch

from ftkit.errors import FtkitError
from ftkit.layout import TokenRule, allowed_tokens, layout_example, stop_token_ids, tokens_made_of
from ftkit.tasks import make_task
from ftkit.tasks.base import Piece, PromptCanvas


def _ids(tok, chars: str) -> frozenset[int]:
    return frozenset(tok.convert_tokens_to_ids(list(chars)))


def test_sudoku_cells_take_digits_separators_are_fixed_and_the_fill_stops(char_tokenizer):
    task = make_task("sudoku", {"rows_on_lines": True})
    ex = task.build_dataset("test", 1, seed=0)[0]
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 512)
    digits = TokenRule(_ids(char_tokenizer, "123456789"))
    for p in range(lay.content_length):
        if lay.fixed[p]:  # givens and the newlines between rows
            assert lay.allowed[p] is None
        else:
            assert lay.allowed[p] == digits
    assert lay.allowed[lay.content_length :] == [TokenRule(frozenset({char_tokenizer.eos_token_id}))] * (96 - 89)


def test_free_text_cannot_stop_before_the_last_fixed_piece(char_tokenizer):
    specials = frozenset(char_tokenizer.all_special_ids)
    eos = char_tokenizer.eos_token_id
    pc = PromptCanvas("p", (Piece("def f():\n", True), Piece("    x = 1\n", False), Piece("    return x\n", True),
                            Piece("# tail", False)))
    lay = layout_example(char_tokenizer, pc, 64, 512)
    middle = lay.allowed[9:19]
    tail = lay.allowed[32:38]
    assert set(middle) == {TokenRule(specials, exclude=True)}  # EOS (and pad, bos...) ruled out
    assert set(tail) == {TokenRule(specials - {eos}, exclude=True)}  # after the last fixed piece it may end
    assert lay.allowed[:9] == [None] * 9 and lay.allowed[19:32] == [None] * 13 and lay.content_length == 38


def test_protein_span_takes_residues_only(char_tokenizer):
    task = make_task("protein", {"mode": "scaffold"})
    ex = task.build_dataset("test", 1, seed=0)[0]
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 112, 512)
    residues = TokenRule(_ids(char_tokenizer, "ACDEFGHIKLMNPQRSTVWY"))
    free = [lay.allowed[p] for p in range(lay.content_length) if not lay.fixed[p]]
    assert free and set(free) == {residues}  # no EOS inside the sequence, even after the last motif


def test_stop_tokens_include_an_end_of_turn_token(char_tokenizer):
    import copy

    tok = copy.deepcopy(char_tokenizer)
    assert stop_token_ids(tok) == {tok.eos_token_id}
    tok.add_special_tokens({"additional_special_tokens": ["<turn|>"]})
    assert stop_token_ids(tok) == {tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")}


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
