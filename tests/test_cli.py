"""The CLI surface: every --help, `validate`, and bad inputs that must give one clear `error:` line, exit code 2,
no traceback and no half-made run directory. Also `generate`/`solve` end to end on a tiny trained run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ftkit.cli import app

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "tiny" / "sudoku.yaml")
COMMANDS = ["validate", "train", "eval", "generate", "solve", "push", "tasks"]
# A held-out style puzzle with a unique solution (43 givens).
PUZZLE = "510060980978215436403070501000501000004027050135006092207003860340008270000750014"

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *needles: str) -> str:
    """Exit 2, exactly one `error:` line (the last line), no traceback; return that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "<bool>" not in result.output  # a flag takes no value
    if command is None:
        for name in COMMANDS:
            assert name in result.output


def test_version():
    from ftkit import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"ftkit {__version__}"


def test_tasks_lists_sudoku():
    result = invoke("tasks")
    assert result.exit_code == 0 and "sudoku" in result.output.split()


def test_validate_good_recipe_prints_resolved_yaml():
    result = invoke("validate", TINY, "train.max_steps=7")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)  # the notes and `ok` go to stderr
    assert resolved["train"]["max_steps"] == 7 and resolved["model"]["base"] == "tiny"


def test_validate_bad_recipe_names_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    assert_clean_error(invoke("validate", bad), "`train.max_stepz`", "did you mean `train.max_steps`")
    assert_clean_error(invoke("validate", TINY, "lora.r=sixteen"), "`lora.r`", "int")


def test_validate_catches_what_train_would_fail_on(tmp_path):
    """Each of these once said `ok` and then failed in `ftkit train` / `ftkit eval`."""
    # Builds, then fails in the grouped expert kernel at the first step: validate runs that step.
    assert_clean_error(invoke("validate", TINY, "model.tiny.hidden=7"), "model.tiny", "strides")
    # The sampler settings go through transformers' DiffusionGemmaGenerationConfig.
    assert_clean_error(
        invoke("validate", TINY, "eval.entropy_bound=0", "eval.temperature_max=0"),
        "`eval.entropy_bound`",
        "DiffusionGemmaGenerationConfig",
    )
    assert_clean_error(
        invoke("validate", TINY, "eval.temperature_min=0.5", "eval.temperature_max=0.5"),
        "`eval.temperature_min`",
        "`eval.temperature_max`",
    )
    # An empty recipe file was all defaults: the 26B hub model and ~50 s of download retries.
    empty = _write(tmp_path / "empty.yaml", "")
    assert_clean_error(invoke("validate", empty), str(empty), "empty")
    assert_clean_error(invoke("train", empty, f"train.output_dir={tmp_path / 'run'}"), str(empty), "empty")
    ok = invoke("validate", TINY)
    assert ok.exit_code == 0 and "meta device" in ok.output and "training step" in ok.output


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs to `train`: each fails before a run directory exists, and leaves none behind


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bad_csv(tmp_path: Path) -> tuple[Path, str]:
    # Line 1 is the header, line 2 a valid row, line 3 a quiz of 80 cells.
    from ftkit.tasks.sudoku import _held_out, grid_to_str

    quiz, sol = _held_out()[0]
    good = f"{grid_to_str(quiz)},{grid_to_str(sol)}"
    path = _write(tmp_path / "puzzles.csv", f"quizzes,solutions\n{good}\n{'1' * 80},{grid_to_str(sol)}\n")
    return path, f"{path}:3"


BAD_TRAIN_INPUTS = {
    "unknown_task": (["task.name=chess"], ["`task.name`", "unknown task 'chess'", "sudoku"]),
    "missing_data_file": (["task.data_path=/nonexistent/puzzles.csv"], ["/nonexistent/puzzles.csv", "not found"]),
    "canvas_too_long": (
        ["model.tiny.canvas_length=85", "task.options.rows_on_lines=true"],
        ["canvas is 90 tokens", "canvas_length=85"],
    ),
    "empty_dataset": (["task.train_size=0"], ["dataset is empty"]),
    "bad_override": (["train.max_steps"], ["KEY.PATH=VALUE"]),
    "bad_task_option": (["task.options.min_givens=5"], ["min_givens"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_INPUTS))
def test_train_bad_input_is_one_clean_line(tmp_path, case):
    overrides, needles = BAD_TRAIN_INPUTS[case]
    out_dir = tmp_path / "run"
    result = invoke("train", TINY, *overrides, f"train.output_dir={out_dir}")
    assert_clean_error(result, *needles)
    assert not out_dir.exists()


def test_train_malformed_yaml_names_line(tmp_path):
    bad = _write(tmp_path / "broken.yaml", "model:\n  base: tiny\ntrain: [unclosed\n  max_steps: 3\n")
    line = assert_clean_error(invoke("train", bad, f"train.output_dir={tmp_path / 'run'}"), str(bad), "malformed YAML")
    assert "line " in line
    assert not (tmp_path / "run").exists()


def test_train_malformed_sudoku_csv_names_file_and_line(tmp_path):
    csv_path, where = _bad_csv(tmp_path)
    out_dir = tmp_path / "run"
    assert_clean_error(
        invoke("train", TINY, f"task.data_path={csv_path}", f"train.output_dir={out_dir}"), where, "expected 81 cells"
    )
    assert not out_dir.exists()


def test_missing_recipe_and_missing_run_dir(tmp_path):
    assert_clean_error(invoke("validate", tmp_path / "nope.yaml"), "not found")
    for command in (
        ["eval", tmp_path / "nope"],
        ["generate", tmp_path / "nope", "-i", PUZZLE],
        ["push", tmp_path / "nope", "--dry-run"],
    ):
        line = assert_clean_error(invoke(*command), "nope")
        assert "not found" in line or "no such run directory" in line


# ----------------------------------------------------------------------------------------------------------------
# A tiny trained run: generate / solve, bad generate inputs, an adapter from another base model


TRAIN_OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(
        "train",
        TINY,
        "train.max_steps=2",
        "task.train_size=8",
        "train.batch_size=4",
        "train.logging_steps=1",
        "train.save_steps=2",
        "eval.num_examples=2",
        "eval.steps=1",
        f"train.output_dir={run}",
    )
    assert result.exit_code == 0, result.output
    assert (run / "adapter_model.safetensors").is_file()
    TRAIN_OUTPUT["text"] = result.output
    return run


def test_piped_training_output_is_one_line_per_log(tiny_run):
    lines = TRAIN_OUTPUT["text"].splitlines()
    assert [ln.split("  ")[0] for ln in lines if ln.startswith("step ")][:2] == ["step 1/2", "step 2/2"]
    assert any(ln.startswith("step 1/2  loss ") for ln in lines)
    assert not any(ln.lstrip().startswith("{") for ln in lines)  # the Trainer's bare dicts
    assert any(ln.startswith("CPU threads: ") for ln in lines)


def test_partial_eval_keeps_eval_json_and_push_cites_only_it(tiny_run, tmp_path):
    """`eval RUN --split train -n 1` used to replace eval.json, and push then published "split train"."""
    canonical = invoke("eval", tiny_run)
    assert canonical.exit_code == 0, canonical.output
    assert "eval plain: 2/2 examples" in canonical.output  # piped: plain progress lines
    assert "the run's own evaluation" in canonical.output
    before = (tiny_run / "eval.json").read_bytes()
    partial = invoke("eval", tiny_run, "--split", "train", "-n", "1")
    assert partial.exit_code == 0, partial.output
    assert (tiny_run / "eval.json").read_bytes() == before
    assert (tiny_run / "eval_train_n1.json").is_file() and "eval_train_n1.json" in partial.output
    folder = tmp_path / "upload"
    assert invoke("push", tiny_run, "--dry-run", "--dry-run-dir", folder).exit_code == 0
    card = (folder / "README.md").read_text()
    assert "split `test`, 2 examples" in card and "split `train`" not in card
    assert not (folder / "eval_train_n1.json").exists()
    # A run without its own evaluation is refused unless told.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare, ignore=shutil.ignore_patterns("eval*.json", "checkpoints"))
    assert_clean_error(invoke("push", bare, "--dry-run"), "no eval.json", "--allow-no-eval")
    assert invoke("push", bare, "--dry-run", "--allow-no-eval").exit_code == 0


def test_solve_prints_grid_and_writes_trajectories(tiny_run, tmp_path):
    png, gif = tmp_path / "t.png", tmp_path / "out" / "t.gif"
    result = invoke("solve", tiny_run, PUZZLE, "--steps", "3", "--save-trajectory", png)
    assert result.exit_code == 0, result.output
    assert "answer" in result.output and "steps used" in result.output and "tokens per forward" in result.output
    assert "│" in result.output  # the 9×9 grid's box rule
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = invoke("generate", tiny_run, "-i", PUZZLE, "--steps", "2", "--live", "--save-trajectory", gif)
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(gif) as img:
        assert img.format == "GIF" and img.n_frames >= 2  # start, steps, answer
    assert not [p for p in gif.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_generate_one_result(tiny_run):
    from ftkit.evaluation.generate import generate_one
    from ftkit.tasks.sudoku import grid_cells

    res = generate_one(tiny_run, PUZZLE.replace("0", "."), steps=2, seed=1, save_trajectory=None)
    assert res.steps_used <= 2 and res.forward_passes >= 1 and res.frames == [] and res.blocks == 1
    cells = grid_cells(res.answer)
    assert len(cells) == 81
    # Clamping: every given sits in the final canvas whatever the model says.
    assert all(cells[i] == q for i, q in enumerate(PUZZLE) if q != "0")
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(res.render())
    text = console.export_text()
    assert "5 1" in text and ("constraint" in text)


def test_solve_on_a_run_of_another_task_says_so(tiny_run, tmp_path):
    """Before: `ftkit solve` on a protein run parsed the puzzle as a protein and complained about its length."""
    protein = tmp_path / "protein-run"
    protein.mkdir()
    recipe = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    recipe["task"] = {"name": "protein", "options": {}}
    (protein / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert_clean_error(invoke("solve", protein, PUZZLE), "a protein run, not a sudoku run", "ftkit generate")


def test_an_empty_answer_is_a_failure(tiny_run, monkeypatch):
    """Before: an empty answer printed "(empty)" and exited 0."""
    import ftkit.evaluation.generate as gen

    real = gen.generate_one

    def ends_at_once(*args, **kwargs):
        result = real(*args, **kwargs)
        result.output = ""
        return result

    monkeypatch.setattr(gen, "generate_one", ends_at_once)
    result = invoke("generate", tiny_run, "-i", PUZZLE, "--steps", "1")
    assert result.exit_code == 1, result.output
    assert "empty answer" in result.output and "all constraints satisfied" not in result.output


@pytest.mark.parametrize(
    "bad_input,needles",
    [
        (PUZZLE[:-1], ["expected 81 cells, got 80"]),
        (PUZZLE[:-1] + "x", ["invalid character 'x'"]),
        ("55" + PUZZLE[2:], ["repeat 5 in row 1"]),
        ("   ", ["input is empty"]),
    ],
)
def test_generate_bad_puzzle_is_clean(tiny_run, bad_input, needles):
    assert_clean_error(invoke("generate", tiny_run, "-i", bad_input, "--steps", "1"), *needles)


def test_generate_bad_trajectory_suffix_and_missing_input_file(tiny_run, tmp_path):
    assert_clean_error(invoke("solve", tiny_run, PUZZLE, "--save-trajectory", tmp_path / "t.jpg"), ".png or .gif")
    assert_clean_error(invoke("solve", tiny_run, f"@{tmp_path / 'missing.txt'}"), "input file not found")
    grid = tmp_path / "grid.txt"
    grid.write_text("\n".join(" ".join(PUZZLE[r * 9 : r * 9 + 9]) for r in range(9)))
    assert invoke("solve", tiny_run, f"@{grid}", "--steps", "1").exit_code == 0


def test_adapter_from_another_base_is_a_clean_error(tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("base", "checkpoints"))
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["model"]["tiny"]["hidden"] = 64  # another tiny base: every LoRA shape differs
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    from ftkit.model.load import load_base
    from ftkit.recipe import load_recipe
    from ftkit.run.rundir import load_run_tokenizer

    changed = load_recipe(other / "recipe.yaml")
    load_base(changed.model, changed.quant, load_run_tokenizer(other), other)  # builds and saves the other base/
    assert_clean_error(invoke("generate", other, "-i", PUZZLE, "--steps", "1"), "does not fit this base model")
    assert_clean_error(invoke("eval", other, "-n", "1", "--steps", "1"), "does not fit this base model")


def test_push_without_adapter_says_train_first(tiny_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_run, partial, ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    assert_clean_error(invoke("push", partial, "--dry-run"), "train first")


# ----------------------------------------------------------------------------------------------------------------
# Input parsers of `generate` for the other tasks (no model needed: parse + lay out with the character tokenizer)


def test_protein_input_length_and_scaffold(char_tokenizer):
    from ftkit.diffusion.token_layout import layout_example
    from ftkit.errors import FtkitError
    from ftkit.evaluation.generate import example_from_input
    from ftkit.tasks import make_task

    task = make_task("protein", {"mode": "scaffold"})
    ex = example_from_input(task, "MKT" + "_" * 20 + "GLL___a")
    assert ex.question == {"length": 30, "motif": [(0, "MKT"), (23, "GLL"), (29, "A")]}
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 512)
    assert lay.content_length == 31 and sum(lay.fixed) == 7  # + the end-of-turn token
    assert example_from_input(task, " 40 ").question == {"length": 40, "motif": []}
    for bad, needle in (("12", "outside"), ("MKX__" + "_" * 30, "'X' at position 3"), ("M" * 30, "no free residue")):
        with pytest.raises(FtkitError, match=needle):
            example_from_input(task, bad)


def test_code_infill_input_hole(char_tokenizer):
    from ftkit.diffusion.token_layout import layout_example
    from ftkit.errors import FtkitError
    from ftkit.evaluation.generate import example_from_input
    from ftkit.tasks import make_task

    task = make_task("code_infill")
    ex = example_from_input(task, "def f(x):\n<HOLE:12>\n    return y\n")
    pieces = task.to_prompt_canvas(ex).pieces
    assert [p.fixed for p in pieces] == [True, False, True]
    assert len(pieces[1].text) == 12 and pieces[1].text.endswith("\n")
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 512)
    assert lay.fixed[:10] == [True] * 10 and lay.fixed[10:22] == [False] * 12
    # A correct middle of the right length satisfies every constraint.
    assert task.check(ex, "def f(x):\n    y = x*2\n    return y\n") == []
    for bad in ("no hole", "a<HOLE>b<HOLE>", "x = <HOLE:0>"):
        with pytest.raises(FtkitError, match="HOLE"):
            example_from_input(task, bad)


def test_recipe_reference_is_up_to_date():
    from ftkit.recipe.reference import DOC_PATH, main, render

    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/recipe-reference.md is stale: python -m ftkit.recipe.reference"
    )
    assert main(["--check"]) == 0
    from ftkit.recipe import schema_rows

    text = DOC_PATH.read_text(encoding="utf-8")
    assert all(f"`{row.key}`" in text for row in schema_rows())
    assert "`task.options.min_givens`" in text
