"""Verifiers for user data: each violation points at the characters at fault, so re-noising works for them."""

from __future__ import annotations

import pytest
import torch

from ftkit.errors import FtkitError
from ftkit.tasks.base import Example, Violation
from ftkit.tasks.verifiers import make_checker, normalize_answer, value_spans

GSM = r"####\s*(.+)"


def ex(answer: str) -> Example:
    return Example(id="data.jsonl row 3", question=None, answer=answer)


def test_exact_with_answer_extraction():
    check = make_checker("exact", answer_regex=GSM)
    reference = ex("She has 3 + 4 = 7 apples.\n#### 7")
    assert check("3 + 4 = 7\n#### 7", reference) == []
    assert check("#### 7.0", reference) == [] and check("####   7", reference) == []
    out = "3 + 4 = 8\n#### 8"
    [v] = check(out, reference)
    assert v.constraint == "answer" and "'8', expected '7'" in v.detail
    assert v.positions == (out.index("#### 8") + 5,)  # exactly the extracted answer's characters
    missing = "3 + 4 = 7\nso 7"
    [v] = check(missing, reference)
    assert v.constraint == "answer_format"
    assert v.positions[0] == missing.index("so 7") and v.positions[-1] >= len(missing)  # last line, then past the end
    # The last match counts (a model may restate the question's format first).
    assert check("#### 5\nno wait\n#### 7", reference) == []


def test_exact_normalizes_numbers_and_whitespace_only():
    assert normalize_answer(" 1,000 ") == normalize_answer("1000") == normalize_answer("$1000.") == "1000"
    assert normalize_answer("2.50") == normalize_answer("2.5") and normalize_answer("7.0") == "7"
    assert normalize_answer("New  York") == "New York" != normalize_answer("new york")
    whole = make_checker("exact")
    assert whole("  Paris \n", ex("Paris")) == []
    [v] = whole("Lyon", ex("Paris"))
    assert v.positions == (0, 1, 2, 3)


def test_exact_on_a_typed_input_only_checks_the_format():
    check = make_checker("exact", answer_regex=GSM)
    assert check("#### 12", ex("")) == []
    assert check("twelve", ex(""))[0].constraint == "answer_format"


def test_regex_full_match_points_where_it_breaks():
    check = make_checker("regex", pattern=r"\d{3}-\d{4}")
    assert check("555-1234", ex("")) == []
    [v] = check("555x1234", ex(""))
    assert v.positions == tuple(range(3, 8)) and "from character 4" in v.detail
    [v] = check("555-12", ex(""))  # a right start that stops short: the positions after it
    assert v.positions[0] == 6 and "stops short" in v.detail
    [v] = check("555-12345", ex(""))  # one too many
    assert v.positions == (8,)
    with pytest.raises(FtkitError, match="task.options.pattern: not a valid regular expression"):
        make_checker("regex", pattern="(")
    with pytest.raises(FtkitError, match="needs a pattern"):
        make_checker("regex")


SCHEMA = {
    "type": "object",
    "required": ["name", "age"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


def test_value_spans():
    text = '{"a": [1, {"b": "x"}], "c" : null}'
    spans = value_spans(text)
    assert text[slice(*spans[("a", 1, "b")])] == '"x"' and text[slice(*spans[("a",)])] == '[1, {"b": "x"}]'
    assert text[slice(*spans[("c",)])] == "null" and spans[()] == (0, len(text))


def test_json_schema_violations_point_at_their_field(tmp_path):
    check = make_checker("json_schema", schema=SCHEMA)
    assert check('{"name": "Ada", "age": 36}', ex("")) == []
    out = '{"name": "Ada", "age": -3, "tags": ["a", 7]}'
    found = {v.detail.split(":")[0]: v for v in check(out, ex(""))}
    assert set(found) == {"age", "tags/1"}
    assert out[found["age"].positions[0] : found["age"].positions[-1] + 1] == "-3"
    assert out[found["tags/1"].positions[0] : found["tags/1"].positions[-1] + 1] == "7"
    [v] = check('{"name": "Ada"}', ex(""))  # a missing field: the object that lacks it
    assert "'age' is a required property" in v.detail and v.positions == tuple(range(15))
    [v] = check('{"name": "Ada", "age": 3', ex(""))
    assert v.constraint == "json" and v.positions[0] >= 24
    path = tmp_path / "s.json"
    path.write_text('{"type": "array"}')
    assert make_checker("json_schema", schema=str(path))("[]", ex("")) == []
    with pytest.raises(FtkitError, match="not a valid JSON Schema"):
        make_checker("json_schema", schema={"type": 5})
    with pytest.raises(FtkitError, match="file not found"):
        make_checker("json_schema", schema=str(tmp_path / "none.json"))


def test_python_checker(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "from ftkit.tasks.base import Violation\n"
        "def even(output, example):\n    return output.strip().isdigit() and int(output) % 2 == 0\n"
        "def spans(output, example):\n"
        "    return [('vowel', 'no vowels', [i for i, c in enumerate(output) if c in 'aeiou'])]\n"
        "def broken(output, example):\n    raise ValueError('boom')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    even = make_checker("python:my_checks:even")
    assert even("42", ex("")) == [] and even("7", ex(""))[0].positions == (0,)
    assert make_checker("python:my_checks:spans")("xa", ex("")) == [Violation("vowel", "no vowels", (1,))]
    with pytest.raises(
        FtkitError, match=r"python:my_checks:broken raised ValueError on example data.jsonl row 3: boom"
    ):
        make_checker("python:my_checks:broken")("x", ex(""))
    for spec, needle in (
        ("python:nowhere_mod:f", "cannot import"),
        ("python:my_checks:missing", "no function"),
        ("python:my_checks", "expected python:module:function"),
        ("fuzzy", "expected one of"),
    ):
        with pytest.raises(FtkitError, match=needle):
            make_checker(spec)


def test_violations_reach_the_tokens_renoising_uses(char_tokenizer):
    """The chat task's verifier through evaluate.make_verifier: the wrong answer's characters become its tokens."""
    from ftkit.evaluation.verify import make_verifier
    from ftkit.tasks import make_task

    task = make_task("chat", {"verifier": "exact", "answer_regex": GSM})
    reference = Example(id="r", question={"messages": (("user", "q"),)}, answer="3 + 4 = 7\n#### 7")
    out = "3 + 4 = 8\n#### 8"
    ids = char_tokenizer(out, add_special_tokens=False).input_ids + [char_tokenizer.convert_tokens_to_ids("<turn|>")]
    ids += [char_tokenizer.eos_token_id] * (32 - len(ids))
    [positions] = make_verifier(char_tokenizer, task, [reference])(torch.tensor([ids]))
    assert positions == [len(out) - 1]
