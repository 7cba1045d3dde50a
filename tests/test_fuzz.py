"""Fuzzing the user-input parsers: whatever the input, they return or raise FtkitError, nothing else."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftkit.errors import FtkitError
from ftkit.recipe import load_recipe, recipe_from_dict, schema_rows
from ftkit.tasks import get_task

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["tiny", "sudoku", "4bit", "none", "1e-3", "cosine", "true", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)

# Real key paths (so the fuzzer reaches the range checks and task options, not only "unknown key").
KEYS = [row.key for row in schema_rows()] + [
    f"task.options.{row.key}" for row in schema_rows(get_task("sudoku").Options)
]


def _nest(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for path, value in pairs:
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


schema_dicts = st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=6).map(_nest)


def _only_ftkit_errors(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except FtkitError as e:
        assert str(e), "an error says what is wrong"
        assert "\n" not in str(e), f"an error is one line: {str(e)!r}"


@FUZZ
@given(schema_dicts)
def test_recipe_from_schema_shaped_dicts(data):
    _only_ftkit_errors(recipe_from_dict, data, where="fuzz.yaml")


@FUZZ
@given(st.one_of(values, st.dictionaries(st.text(max_size=10), values, max_size=4)))
def test_recipe_from_random_values(data):
    _only_ftkit_errors(recipe_from_dict, data, where="fuzz.yaml")


@FUZZ
@given(st.lists(st.text(alphabet=string.printable, max_size=24), max_size=3))
def test_recipe_overrides(overrides):
    _only_ftkit_errors(recipe_from_dict, {}, where="fuzz.yaml", overrides=overrides)


yaml_like = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=string.printable, max_size=200),
    st.lists(
        st.sampled_from(
            [
                "model:",
                "  base: tiny",
                "train:",
                "  max_steps: 3",
                "- a",
                "[",
                "{",
                "}",
                "]",
                ":",
                "&a",
                "*a",
                "!!python/object:os.system",
                "? [1]",
                "  ",
                "\t",
                "task:",
                "  name: x",
                "'",
                '"',
                "%YAML 1.1",
                "---",
                "...",
            ]
        ),
        max_size=10,
    ).map("\n".join),
)


@FUZZ
@given(yaml_like)
def test_load_recipe_on_random_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _only_ftkit_errors(load_recipe, path)


@FUZZ
@given(st.binary(max_size=64))
def test_load_recipe_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_bytes(data)
    _only_ftkit_errors(load_recipe, path)


grid_text = st.one_of(st.text(max_size=100), st.text(alphabet="0123456789.", min_size=75, max_size=85))


@FUZZ
@given(grid_text, st.booleans())
def test_sudoku_parse_grid(text, blanks):
    from ftkit.tasks.sudoku import parse_grid

    _only_ftkit_errors(parse_grid, text, "fuzz", blanks=blanks)


csv_rows = st.lists(st.one_of(st.text(max_size=120), st.tuples(grid_text, grid_text).map(",".join)), max_size=5)


@FUZZ
@given(csv_rows)
def test_sudoku_load_csv(tmp_path_factory, rows):
    from ftkit.tasks.sudoku import load_csv

    path = tmp_path_factory.mktemp("fuzz") / "p.csv"
    path.write_text("\n".join(rows), encoding="utf-8", errors="surrogatepass")
    _only_ftkit_errors(load_csv, path)


@FUZZ
@given(st.binary(max_size=200))
def test_sudoku_load_csv_bytes(tmp_path_factory, data):
    from ftkit.tasks.sudoku import load_csv

    path = tmp_path_factory.mktemp("fuzz") / "p.csv"
    path.write_bytes(data)
    _only_ftkit_errors(load_csv, path)


@FUZZ
@given(st.text(max_size=120))
def test_generate_sudoku_input_parser(text):
    from ftkit.evaluation.generate import example_from_input
    from ftkit.tasks import make_task

    _only_ftkit_errors(example_from_input, make_task("sudoku"), text)


# ----------------------------------------------------------------------------------------------------------------
# Regression tests for the bugs this fuzzing found (fixed)


def test_bug_tiny_kv_heads_zero():
    with pytest.raises(FtkitError, match="kv_heads"):
        recipe_from_dict({"model": {"tiny": {"kv_heads": 0}}})


def test_bug_huge_int_for_float_key():
    with pytest.raises(FtkitError, match="learning_rate"):
        recipe_from_dict({"train": {"learning_rate": 10**400}})


def test_bug_invalid_yaml_timestamp(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("hub:\n  repo: 2001-13-01\n")
    with pytest.raises(FtkitError, match="r.yaml"):
        load_recipe(path)


def test_bug_sudoku_csv_not_utf8(tmp_path):
    from ftkit.tasks.sudoku import load_csv

    path = tmp_path / "p.csv"
    path.write_bytes(b"quizzes,solutions\n\x80\x81\n")
    with pytest.raises(FtkitError, match="p.csv"):
        load_csv(path)


def test_a_key_with_a_newline_still_gives_a_one_line_error():
    with pytest.raises(FtkitError) as e:
        recipe_from_dict({"train": {"a\nb": 1}})
    assert "\n" not in str(e.value) and "'a\\nb'" in str(e.value)
