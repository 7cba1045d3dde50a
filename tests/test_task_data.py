"""Task data through `datasets`: examples and layouts built once per fingerprint, rebuilt when what they depend on
changes, returned exactly as the task built them."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from ftkit.diffusion.token_layout import layout_example
from ftkit.errors import FtkitError
from ftkit.tasks import make_task
from ftkit.tasks.data import LayoutDataset, examples_dataset, load_examples, load_layouts
from ftkit.tasks.sudoku import SudokuTask


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Counts SudokuTask.build_dataset runs; a fresh datasets cache per test."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    counter = {"n": 0}
    real = SudokuTask.build_dataset

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SudokuTask, "build_dataset", counting)
    return counter


def test_examples_are_built_once_per_fingerprint(calls, tmp_path):
    task = make_task("sudoku")
    first = load_examples(task, "train", 6, seed=1)
    again = load_examples(make_task("sudoku"), "train", 6, seed=1)  # a new process would see the same cache
    assert calls["n"] == 1 and again == first
    load_examples(task, "train", 7, seed=1)
    load_examples(task, "train", 6, seed=2)
    load_examples(make_task("sudoku", {"min_givens": 40}), "train", 6, seed=1)
    assert calls["n"] == 4  # size, seed and options are part of the fingerprint

    data = tmp_path / "p.csv"
    rows = [f"{q},{s}" for q, s in ((ex.question, ex.answer) for ex in first)]
    data.write_text("quizzes,solutions\n" + "\n".join(rows * 2) + "\n")
    load_examples(task, "train", 3, 0, str(data))
    load_examples(task, "train", 3, 0, str(data))
    assert calls["n"] == 5
    data.write_text("quizzes,solutions\n" + "\n".join(rows * 3) + "\n")  # an edited file is read again
    load_examples(task, "train", 3, 0, str(data))
    assert calls["n"] == 6
    assert first == task.build_dataset("train", 6, 1)  # what the builder makes, unchanged by the cache


def test_examples_come_back_exactly_as_built():
    task = make_task("protein", {"mode": "scaffold"})
    built = task.build_dataset("test", 4, 0)
    loaded = load_examples(task, "test", 4, 0)
    assert loaded == built
    assert all(isinstance(start_residues, tuple) for ex in loaded for start_residues in ex.question["motif"])
    infill = make_task("code_infill")
    assert load_examples(infill, "test", 3, 0) == infill.build_dataset("test", 3, 0)  # None values, nested dicts


def test_fewer_examples_than_asked_is_said(caplog):
    task = make_task("protein", {"family": "LuxC", "min_length": 90})
    with caplog.at_level(logging.WARNING, logger="ftkit.tasks.data"):
        got = load_examples(task, "test", 10_000, 0)
    assert 0 < len(got) < 10_000
    assert f"10000 test example(s) asked, {len(got)} built" in caplog.text


def test_layouts_match_layout_example_and_are_cached(char_tokenizer):
    task = make_task("sudoku")
    ds = examples_dataset(task, "test", 4, 0)
    layouts = load_layouts(task, ds, char_tokenizer, 96, 256)
    direct = [
        layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 256, ex.id, token_rules=False)
        for ex in task.build_dataset("test", 4, 0)
    ]
    assert [LayoutDataset(layouts)[i] for i in range(4)] == direct
    again = load_layouts(task, ds, char_tokenizer, 96, 256)
    assert again.cache_files == layouts.cache_files  # the same Arrow file, read back


@dataclasses.dataclass(frozen=True)
class _Options:
    pass


class _Skipping:
    """A task with one over-long example among short ones and `skip_bad_rows`."""

    name = "sudoku"  # the cache key needs a registered name; the generator itself is not used here
    options = _Options()
    skip_bad_rows = True

    def to_prompt_canvas(self, example):
        from ftkit.tasks.base import Piece, PromptCanvas

        return PromptCanvas(prompt="q", pieces=(Piece(example.answer, False),))


def test_bad_rows_are_skipped_and_counted_or_an_error(char_tokenizer, caplog):
    from datasets import Dataset

    from ftkit.tasks.base import Example
    from ftkit.tasks.data import example_to_row

    rows = [
        example_to_row(Example(id=f"data.jsonl row {i}", question=None, answer="x" * n))
        for i, n in enumerate([3, 40, 5])
    ]
    ds = Dataset.from_list(rows)
    with caplog.at_level(logging.WARNING, logger="ftkit.tasks.data"):
        kept = load_layouts(_Skipping(), ds, char_tokenizer, 16, 64)
    assert len(kept) == 2
    assert "skipped 1 of 3" in caplog.text and "data.jsonl row 1: canvas is 41 tokens" in caplog.text
    strict = _Skipping()
    strict.skip_bad_rows = False
    with pytest.raises(FtkitError, match="example data.jsonl row 1: canvas is 41 tokens"):
        load_layouts(strict, ds, char_tokenizer, 16, 64)


def test_eval_and_rl_skip_bad_rows_through_the_same_helper(char_tokenizer, caplog):
    """`lay_out_examples` is the one skip-bad-rows loop: evaluation and rl keep the rows that fit (with the sampler's
    token rules, as `layout_example` gives them) and each warns on its own logger."""
    from ftkit.evaluation.core import _lay_out
    from ftkit.rl.run import one_canvas_layouts
    from ftkit.tasks.base import Example
    from ftkit.tasks.data import lay_out_examples

    examples = [Example(id=f"data.jsonl row {i}", question=None, answer="x" * n) for i, n in enumerate([3, 40, 5])]
    kept, layouts, skipped = lay_out_examples(_Skipping(), char_tokenizer, examples, 16, 64)
    assert [ex.id for ex in kept] == ["data.jsonl row 0", "data.jsonl row 2"]
    assert layouts == [layout_example(char_tokenizer, _Skipping().to_prompt_canvas(ex), 16, 64, ex.id) for ex in kept]
    assert len(skipped) == 1 and "data.jsonl row 1: canvas is 41 tokens" in skipped[0]
    with caplog.at_level(logging.WARNING):
        assert [ex.id for ex in _lay_out(_Skipping(), char_tokenizer, examples, 16, 64)[0]] == [ex.id for ex in kept]
        assert [ex.id for ex in one_canvas_layouts(_Skipping(), char_tokenizer, examples, 16, 64)[0]] == [
            ex.id for ex in kept
        ]
    said = [(r.name, r.getMessage()) for r in caplog.records]
    assert said == [
        (
            "ftkit.evaluation.core",
            f"evaluation: skipped 1 of 3 example(s) that do not fit the model (first: {skipped[0]})",
        ),
        ("ftkit.rl.run", f"rl: skipped 1 of 3 training example(s) that do not fit the model (first: {skipped[0]})"),
    ]
    strict = _Skipping()
    strict.skip_bad_rows = False
    with pytest.raises(FtkitError, match="example data.jsonl row 1: canvas is 41 tokens"):
        _lay_out(strict, char_tokenizer, examples, 16, 64)


def test_only_the_data_module_decides_on_bad_rows():
    """The skip-bad-rows decision lives in `ftkit.tasks.data` alone (a task only sets `skip_bad_rows`): a second
    copy of the loop elsewhere would drift from it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ftkit"
    deciders = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if 'getattr(task, "skip_bad_rows"' in p.read_text(encoding="utf-8")
    )
    assert deciders == ["tasks/data.py"]


def test_training_data_says_when_the_task_builds_fewer_than_asked(char_tokenizer, caplog):
    """Before: recipes/tiny/code_infill.yaml asked for 2,000 examples and silently trained on ~480."""
    from ftkit.recipe import recipe_from_dict
    from ftkit.tasks.data import build_training_data

    recipe = recipe_from_dict(
        {
            "model": {"base": "tiny"},
            "task": {"name": "protein", "train_size": 10_000, "options": {"family": "LuxC", "min_length": 90}},
        }
    )
    task = make_task("protein", recipe.task.options)
    with caplog.at_level(logging.WARNING, logger="ftkit.tasks.data"):
        data = build_training_data(task, char_tokenizer, recipe, 112)
    assert 0 < len(data) < 10_000
    assert f"10000 train example(s) asked, {len(data)} built" in caplog.text
