"""Code infill task: JSONL errors, stdlib/HumanEval data, every constraint, metrics, layout."""

from __future__ import annotations

import json

import pytest

from ftkit.diffusion.token_layout import canvas_to_text, layout_example
from ftkit.errors import FtkitError
from ftkit.model.char_tokenizer import build_char_tokenizer
from ftkit.tasks import make_task
from ftkit.tasks.code_infill import HOLE, load_jsonl

ADD = {
    "id": "add",
    "prefix": "def add(a, b):\n    total = a\n",
    "middle": "    total += b\n",
    "suffix": "    return total\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
LOOP = {
    "id": "loop",
    "prefix": "def first(xs):\n    for x in xs:\n",
    "middle": "        return x\n",
    "suffix": "    return None\n",
}


def write_jsonl(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def user_example(task, record):
    return task._example(
        record["id"],
        "user",
        record["prefix"],
        record["middle"],
        record["suffix"],
        test=record.get("test"),
        entry_point=record.get("entry_point"),
    )


# -- data


@pytest.mark.parametrize(
    "bad, words",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prefix": "", "suffix": ""}), "`middle` must be a string"),
        (json.dumps({"prefix": "", "middle": "", "suffix": ""}), "`middle` is empty"),
        (json.dumps({**LOOP, "colour": "red"}), "unknown key(s) colour"),
        (json.dumps({**ADD, "entry_point": None}), "`test` and `entry_point` go together"),
        (json.dumps({**LOOP, "prefix": 3}), "`prefix` must be a string"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, bad, words):
    path = write_jsonl(tmp_path, [LOOP, "", bad])  # the bad record is on line 3
    with pytest.raises(FtkitError) as err:
        load_jsonl(path)
    assert f"{path}:3" in str(err.value) and words in str(err.value)


def test_missing_or_empty_jsonl(tmp_path):
    with pytest.raises(FtkitError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FtkitError, match="no records"):
        load_jsonl(write_jsonl(tmp_path, [""]))


def test_user_data_split_is_deterministic_and_disjoint(tmp_path):
    records = [{**LOOP, "id": f"r{i}"} for i in range(60)]
    path = str(write_jsonl(tmp_path, records))
    task = make_task("code_infill", {})
    train = task.build_dataset("train", 100, 0, data_path=path)
    test = task.build_dataset("test", 100, 0, data_path=path)
    assert len(train) + len(test) == 60 and test
    assert not {e.id for e in train} & {e.id for e in test}
    assert [e.id for e in task.build_dataset("test", 100, 0, data_path=path)] == [e.id for e in test]


def test_stdlib_data_holds_out_whole_packages():
    task = make_task("code_infill", {})
    train = task.build_dataset("train", 10_000, 0)
    test = task.build_dataset("test", 10_000, 0)
    package = lambda e: e.id.split("/")[1].split(".")[0]  # noqa: E731
    assert len(train) > 100 and len(test) > 5
    assert not {package(e) for e in train} & {package(e) for e in test}
    for ex in train[:50] + test:
        assert len(ex.answer) <= 160
        assert task.check(ex, ex.answer) == []
        middle = ex.answer[len(ex.question["prefix"]) : len(ex.answer) - len(ex.question["suffix"])]
        assert middle.strip() and middle.endswith("\n") and not middle.startswith(("def ", "async def "))


def test_humaneval_is_test_only_and_stdlib_trains():
    task = make_task("code_infill", {"source": "humaneval"})
    test = task.build_dataset("test", 500, 0)
    assert test and all(e.id.startswith("HumanEval/") and e.question["test"] for e in test)
    assert all(e.id.startswith("stdlib/") for e in task.build_dataset("train", 20, 0))


# -- constraints


def test_valid_fill_passes_and_tests_run():
    task = make_task("code_infill", {})
    ex = user_example(task, ADD)
    assert task.check(ex, ex.answer) == []
    different_but_right = ex.answer.replace("    total += b\n", "    total = b + a\n")
    assert task.check(ex, different_but_right) == []


def constraint_names(violations):
    return [v.constraint for v in violations]


def test_prefix_violation():
    task = make_task("code_infill", {})
    ex = user_example(task, LOOP)
    out = ex.answer.replace("def first", "def fist_")
    (v,) = task.check(ex, out)
    assert v.constraint == "prefix" and v.positions == (6, 7, 8)


def test_suffix_violation():
    task = make_task("code_infill", {})
    ex = user_example(task, LOOP)
    out = ex.answer.replace("return None", "return 0   ")
    (v,) = task.check(ex, out)
    at = ex.answer.index("None")
    assert v.constraint == "suffix" and v.positions == tuple(range(at, at + 4))
    shortened = ex.answer[: -len("    return None\n")]  # ended early (EOS): the suffix is missing
    assert "suffix" in constraint_names(task.check(ex, shortened))


def test_parse_violation_points_at_the_line():
    task = make_task("code_infill", {})
    ex = user_example(task, LOOP)
    out = LOOP["prefix"] + "        return (x\n" + LOOP["suffix"]
    violations = task.check(ex, out)
    assert constraint_names(violations) == ["parse"]
    start = len(LOOP["prefix"])
    assert set(violations[0].positions) & set(range(start, start + 18))


def test_compile_violation():
    task = make_task("code_infill", {})
    ex = user_example(task, {**LOOP, "prefix": "def first(xs):\n    if xs:\n", "middle": "        return xs[0]\n"})
    out = "def first(xs):\n    if xs:\n        break\n    return None\n"  # parses, but break is outside a loop
    (v,) = task.check(ex, out)
    assert v.constraint == "compile" and "break" in v.detail
    line = out.index("        break")
    assert v.positions == tuple(range(line, line + len("        break\n")))


def test_tests_violation():
    task = make_task("code_infill", {})
    ex = user_example(task, ADD)
    wrong = ex.answer.replace("    total += b\n", "    total -= b\n")
    (v,) = task.check(ex, wrong)
    assert v.constraint == "tests" and "AssertionError" in v.detail
    middle = len(ADD["prefix"])
    assert v.positions == tuple(range(middle, middle + len("    total -= b\n")))
    hang = ex.answer.replace("    total += b\n", "    while 1: b\n")
    slow = make_task("code_infill", {"test_timeout_s": 1.0})
    (v,) = slow.check(ex, hang)
    assert v.constraint == "tests" and "timed out" in v.detail


# -- metrics


def test_ground_truth_scores_perfectly_with_tests(tmp_path):
    task = make_task("code_infill", {})
    examples = [user_example(task, ADD), user_example(task, LOOP)]
    m = task.metrics(examples, [e.answer for e in examples])
    for key in ["prefix_suffix_preserved", "parse_rate", "compile_rate", "exact_match", "pass_rate"]:
        assert m[key] == 1.0, key
    assert m["count"] == 2.0 and m["count/lines_1"] == 2.0


def test_humaneval_ground_truth_passes_and_wrong_fills_fail():
    task = make_task("code_infill", {"source": "humaneval"})
    examples = task.build_dataset("test", 4, 0)
    m = task.metrics(examples, [e.answer for e in examples])
    assert m["pass_rate"] == 1.0 and m["exact_match"] == 1.0 and m["compile_rate"] == 1.0
    broken = []
    for e in examples:
        start = len(e.question["prefix"])
        end = len(e.answer) - len(e.question["suffix"])
        indent = e.answer[start:end][: len(e.answer[start:end]) - len(e.answer[start:end].lstrip())]
        broken.append(e.answer[:start] + indent + "raise ValueError\n" + e.answer[end:])
    bad = task.metrics(examples, broken)
    assert bad["pass_rate"] == 0.0 and bad["exact_match"] == 0.0 and bad["prefix_suffix_preserved"] == 1.0


def test_metrics_without_tests_have_no_pass_rate():
    task = make_task("code_infill", {})
    ex = user_example(task, LOOP)
    m = task.metrics([ex, ex], [ex.answer, "garbage("])
    assert "pass_rate" not in m
    assert m["exact_match"] == 0.5 and m["parse_rate"] == 0.5 and m["prefix_suffix_preserved"] == 0.5


# -- layout


@pytest.mark.parametrize("source", ["stdlib", "humaneval"])
def test_layout_round_trip(source):
    tok = build_char_tokenizer()
    task = make_task("code_infill", {"source": source})
    for ex in task.build_dataset("test", 5, 0):
        pc = task.to_prompt_canvas(ex)
        assert pc.canvas_text == ex.answer
        assert HOLE in pc.prompt and ex.question["prefix"] + HOLE in pc.prompt
        lay = layout_example(tok, pc, canvas_length=161, max_prompt_length=2048, example_id=ex.id)
        assert canvas_to_text(tok, lay.canvas_ids) == ex.answer
        assert lay.content_length == len(ex.answer) + 1  # + the end-of-turn token, free
        n_prefix, n_suffix = len(ex.question["prefix"]), len(ex.question["suffix"])
        fixed = lay.fixed[: lay.content_length - 1]
        assert all(fixed[:n_prefix]) and all(fixed[len(fixed) - n_suffix :])
        assert not any(fixed[n_prefix : len(fixed) - n_suffix])  # the middle: free, oracle length


def test_recipes_validate():
    from ftkit.recipe import load_recipe

    for path in ["recipes/code_infill.yaml", "recipes/tiny/code_infill.yaml"]:
        assert load_recipe(path).task.name == "code_infill"
    tiny = load_recipe("recipes/tiny/code_infill.yaml")
    assert tiny.task.options["max_canvas_chars"] < tiny.model.tiny.canvas_length  # + the end-of-turn token
