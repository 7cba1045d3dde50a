"""The chat task: data from any `datasets` source, bad rows named or skipped, the chat format, multi-block answers,
and the three commands end to end on a tiny run."""

from __future__ import annotations

import json
import logging
import re

import pytest
from tiny_specs import tiny_dims

from ftkit.diffusion.token_layout import end_of_turn_id, layout_example
from ftkit.errors import FtkitError
from ftkit.tasks import make_task

GSM = r"####\s*(-?\d+)"


def chats(n=40, long_every=0):
    rows = []
    for i in range(n):
        answer = f"{i} + 1 = {i + 1}\n#### {i + 1}"
        if long_every and i % long_every == 0:
            answer = "".join(f"step {k}: {i} + {k} = {i + k}\n" for k in range(12)) + f"#### {i + 11}"
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Be exact."},
                    {"role": "user", "content": f"What is {i} + 1?"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_jsonl_splits_and_layout(tmp_path, char_tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", chats())
    task = make_task("chat", {"dataset": str(data), "answer_regex": GSM})
    train, test, every = (task.build_dataset(s, 100, 0) for s in ("train", "test", "all"))
    assert len(every) == 40 and 0 < len(test) < 10 and len(train) + len(test) == 40
    assert not {e.id for e in train} & {e.id for e in test}
    assert task.build_dataset("train", 100, 0) == train and len(task.build_dataset("train", 5, 0)) == 5
    ex = next(e for e in every if e.meta["row"] == 4)
    assert ex.id == "chat.jsonl row 4" and ex.answer == "3 + 1 = 4\n#### 4"
    assert ex.question["messages"] == (("system", "Be exact."), ("user", "What is 3 + 1?"))
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 32, 128, ex.id, max_blocks=None)
    assert char_tokenizer.decode(lay.prompt_ids) == (
        "<bos><|turn>system\nBe exact.<turn|>\n<|turn>user\nWhat is 3 + 1?<turn|>\n<|turn>model\n"
    )
    assert lay.canvas_ids[: lay.content_length] == (
        char_tokenizer(ex.answer, add_special_tokens=False).input_ids + [end_of_turn_id(char_tokenizer)]
    )
    assert task.check(ex, ex.answer) == [] and task.metrics([ex], [ex.answer])["verified"] == 1.0


def test_a_long_answer_spans_blocks(tmp_path, char_tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", chats(10, long_every=3))
    task = make_task("chat", {"dataset": str(data)})
    long = next(e for e in task.build_dataset("all", 100, 0) if e.meta["row"] == 1)
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(long), 64, 128, long.id, max_blocks=None)
    assert lay.num_blocks == 4 and lay.content_length == len(long.answer) + 1


@pytest.mark.parametrize("kind", ["csv", "parquet", "arrow", "save_to_disk"])
def test_prompt_completion_columns_from_other_formats(tmp_path, kind):
    from datasets import Dataset

    ds = Dataset.from_list([{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(12)])
    if kind == "csv":
        source = tmp_path / "d.csv"
        ds.to_csv(str(source))
    elif kind == "parquet":
        source = tmp_path / "d.parquet"
        ds.to_parquet(str(source))
    elif kind == "save_to_disk":
        source = tmp_path / "saved"
        ds.save_to_disk(str(source))
    else:
        ds.save_to_disk(str(tmp_path / "tmp"))
        source = next((tmp_path / "tmp").glob("*.arrow"))
    task = make_task(
        "chat",
        {
            "dataset": str(source),
            "prompt_column": "question",
            "completion_column": "answer",
            "system_prompt": "Answer.",
            "verifier": "none",
        },
    )
    every = task.build_dataset("all", 100, 0)
    assert sorted(e.answer for e in every) == sorted(f"a{i}" for i in range(12))
    assert every[0].question["messages"][0] == ("system", "Answer.")


def test_a_test_split_of_its_own(tmp_path):
    """With test_split, train reads all of its split and test all of the other (as for GSM8K on the Hub)."""
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {
            "train": Dataset.from_list([{"q": f"q{i}", "a": f"#### {i}"} for i in range(20)]),
            "test": Dataset.from_list([{"q": f"t{i}", "a": f"#### {i}"} for i in range(5)]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    task = make_task(
        "chat",
        {
            "dataset": str(tmp_path / "dd"),
            "test_split": "test",
            "prompt_column": "q",
            "completion_column": "a",
            "answer_regex": r"####\s*(.+)",
        },
    )
    assert len(task.build_dataset("train", 100, 0)) == 20
    assert sorted(e.question["messages"][-1][1] for e in task.build_dataset("test", 100, 0)) == [
        f"t{i}" for i in range(5)
    ]
    with pytest.raises(FtkitError, match="no split 'dev'"):
        make_task(
            "chat",
            {"dataset": str(tmp_path / "dd"), "train_split": "dev", "prompt_column": "q", "completion_column": "a"},
        ).build_dataset("train", 5, 0)


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "the last turn must be the assistant's answer"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        "the answer (completion) is empty",
    ),
    ({"messages": "hello"}, "must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "turn 1: expected"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}, "turn 1: expected"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no marker"}]},
        "no match of task.options.answer_regex",
    ),
    ({"other": 1}, "`messages` is missing"),
]


@pytest.mark.parametrize("bad,needle", BAD_ROWS, ids=[n[:24] for _, n in BAD_ROWS])
def test_a_bad_row_is_an_error_naming_file_and_row_or_skipped_and_counted(tmp_path, bad, needle, caplog):
    rows = chats(6)
    rows.insert(3, bad)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(FtkitError, match=rf"chat\.jsonl row 4: .*{re.escape(needle[:20])}"):
        make_task("chat", {"dataset": str(data), "answer_regex": GSM}).build_dataset("train", 100, 0)
    skipping = make_task("chat", {"dataset": str(data), "answer_regex": GSM, "on_bad_row": "skip"})
    with caplog.at_level(logging.WARNING, logger="ftkit.tasks.chat"):
        assert len(skipping.build_dataset("all", 100, 0)) == 6
    assert "skipped 1 bad row(s) of 7" in caplog.text and "chat.jsonl row 4" in caplog.text


def test_columns_and_types_of_prompt_completion_rows(tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": 3}, {"q": "e"}])
    task = make_task(
        "chat",
        {
            "dataset": str(data),
            "prompt_column": "q",
            "completion_column": "a",
            "verifier": "none",
            "on_bad_row": "error",
        },
    )
    with pytest.raises(FtkitError, match="pc.jsonl row 2|pc.jsonl: "):
        task.build_dataset("all", 10, 0)
    with pytest.raises(FtkitError, match="prompt_column and completion_column go together"):
        make_task("chat", {"prompt_column": "q"})


def test_an_over_long_prompt_names_its_row_or_is_skipped(tmp_path, char_tokenizer, caplog):
    from ftkit.tasks.data import examples_dataset, load_layouts

    rows = chats(5)
    rows[2]["messages"][1]["content"] = "x" * 300
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    strict = make_task("chat", {"dataset": str(data), "answer_regex": GSM})
    ds = examples_dataset(strict, "all", 100, 0, str(data))
    with pytest.raises(
        FtkitError, match=r"example chat\.jsonl row 3: prompt is \d+ tokens, over train.max_prompt_length=128"
    ):
        load_layouts(strict, ds, char_tokenizer, 32, 128)
    lenient = make_task("chat", {"dataset": str(data), "answer_regex": GSM, "on_bad_row": "skip"})
    with caplog.at_level(logging.WARNING, logger="ftkit.tasks.data"):
        kept = load_layouts(lenient, examples_dataset(lenient, "all", 100, 0, str(data)), char_tokenizer, 32, 128)
    assert len(kept) == 4 and "skipped 1 of 5" in caplog.text


def test_sources_that_cannot_load_are_one_clear_error(tmp_path):
    hub = make_task("chat", {"dataset": "openai/gsm8k", "config": "main"})
    with pytest.raises(
        FtkitError,
        match=r"task.options.dataset='openai/gsm8k': no such local path .*, not in the "
        r"local Hugging Face cache, and the Hub cannot be used \(offline mode is on",
    ):
        hub.build_dataset("train", 5, 0)
    with pytest.raises(FtkitError, match="data file not found"):
        make_task("chat", {"dataset": str(tmp_path / "missing.jsonl")}).build_dataset("train", 5, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(FtkitError, match=r"bad\.jsonl:2: invalid JSON"):
        make_task("chat", {"dataset": str(bad)}).build_dataset("train", 5, 0)
    odd = tmp_path / "d.txt"
    odd.write_text("x")
    with pytest.raises(FtkitError, match="unknown data file type '.txt'"):
        make_task("chat", {"dataset": str(odd)}).build_dataset("train", 5, 0)
    with pytest.raises(FtkitError, match="no data; set task.options.dataset"):
        make_task("chat").build_dataset("train", 5, 0)
    with pytest.raises(FtkitError, match="is a single file"):
        make_task("chat", {"dataset": str(bad), "test_split": "test"}).build_dataset("test", 5, 0)


def test_recipe_validation_catches_verifier_options():
    from ftkit.errors import RecipeError
    from ftkit.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="answer_regex: not a valid regular expression"):
        recipe_from_dict({"task": {"name": "chat", "options": {"answer_regex": "(("}}})
    with pytest.raises(RecipeError, match="on_bad_row"):
        recipe_from_dict({"task": {"name": "chat", "options": {"on_bad_row": "ignore"}}})
    ok = recipe_from_dict(
        {"task": {"name": "chat", "options": {"verifier": "json_schema", "schema": {"type": "object"}}}}
    )
    assert ok.task.options["schema"] == {"type": "object"}


# ----------------------------------------------------------------------------------------------------------------
# The three commands on a tiny chat run


TINY = tiny_dims(16, layers=1)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    import yaml
    from typer.testing import CliRunner

    from ftkit.cli import app

    root = tmp_path_factory.mktemp("chat")
    data = write_jsonl(root / "train.jsonl", chats(24, long_every=4))
    recipe = {
        "model": {"base": "tiny", "dtype": "float32", "tiny": TINY},
        "lora": {"r": 4, "alpha": 8, "dense_mlp": True},
        "train": {
            "output_dir": str(root / "run"),
            "max_steps": 2,
            "batch_size": 4,
            "logging_steps": 1,
            "save_steps": 2,
            "max_prompt_length": 128,
        },
        "task": {
            "name": "chat",
            "train_size": 24,
            "test_size": 4,
            "options": {"dataset": str(data), "answer_regex": GSM},
        },
        "eval": {"num_examples": 2, "batch_size": 2, "steps": 2, "max_new_tokens": 48},
    }
    (root / "chat.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(root / "chat.yaml")])
    assert result.exit_code == 0, result.output
    return root


def test_eval_on_a_data_file_without_editing_the_recipe(chat_run):
    from typer.testing import CliRunner

    from ftkit.cli import app

    other = write_jsonl(chat_run / "held.jsonl", chats(5, long_every=2))
    result = CliRunner().invoke(app, ["eval", str(chat_run / "run"), "--data", str(other), "--steps", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((chat_run / "run" / "eval_data-held_steps1.json").read_text())
    assert report["num_examples"] == 5 and report["split"] == "all" and report["data_path"] == str(other)
    assert not (chat_run / "run" / "eval.json").exists()  # the recipe's own evaluation is not replaced
    records = report["modes"]["plain"]["records"]
    assert {r["id"] for r in records} == {f"held.jsonl row {i}" for i in range(1, 6)}
    assert all(1 <= r["blocks"] <= 3 for r in records)  # max_new_tokens 48 = three 16-token canvases
    assert "verified" in report["metrics"] and "answer_found" in report["metrics"]


def test_generate_goes_block_after_block_and_prints_blocks(chat_run, monkeypatch):
    from ftkit.evaluation.generate import generate_one

    landed = []
    res = generate_one(
        chat_run / "run",
        "What is 2 + 1?",
        steps=1,
        max_new_tokens=48,
        on_block=lambda k, text, last: landed.append((k, last)),
    )
    assert 1 <= res.blocks <= 3 and [k for k, _ in landed] == list(range(res.blocks))
    assert landed[-1][1] and not any(last for _, last in landed[:-1])
    # The CLI prints the blocks of a multi-block answer as they land (and nothing extra for a one-block one).
    from typer.testing import CliRunner

    import ftkit.evaluation.generate as gen
    from ftkit.cli import app

    def scripted(*args, on_block=None, **kwargs):
        on_block(0, "first part", False)
        on_block(1, "#### 3", True)
        return res

    monkeypatch.setattr(gen, "generate_one", scripted)
    out = CliRunner().invoke(app, ["generate", str(chat_run / "run"), "-i", "What is 2 + 1?"]).output
    assert "block 1: first part" in out and "block 2: #### 3" in out


def test_an_edited_data_file_is_read_again(tmp_path):
    """The chat task's own data file (task.options.dataset) is part of the cache fingerprint (`data_state`)."""
    from ftkit.tasks.data import load_examples

    data = write_jsonl(tmp_path / "chat.jsonl", chats(4))
    task = make_task("chat", {"dataset": str(data), "answer_regex": GSM})
    assert len(load_examples(task, "all", 100, 0)) == 4
    write_jsonl(data, chats(7))
    assert len(load_examples(make_task("chat", {"dataset": str(data), "answer_regex": GSM}), "all", 100, 0)) == 7
