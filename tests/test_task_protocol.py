"""One place per task: input parsing and the look live on the task; external tasks register through the entry point
group `ftkit.tasks`; trajectory images are readable grids with a colour key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import ftkit.tasks.base as base
from ftkit.diffusion.token_layout import layout_example
from ftkit.errors import FtkitError
from ftkit.evaluation.generate import GenerateResult, _canvas_map, _frame, example_from_input
from ftkit.evaluation.trajectory import contact_sheet, trajectory_images
from ftkit.tasks import get_task, known_tasks, make_task
from ftkit.tasks.sudoku import SudokuView, grid_cells
from ftkit.tasks.view import CHANGED_FILL, GIVEN_FILL, VIOLATION_FILL, Frame, TextView, view_of

PLUGIN = """
from dataclasses import dataclass

from ftkit.tasks.base import Example, Piece, PromptCanvas


@dataclass(frozen=True)
class EchoOptions:
    times: int = 1


class EchoTask:
    name = "echo"
    Options = EchoOptions

    def __init__(self, options=None):
        self.options = options or EchoOptions()

    def build_dataset(self, split, size, seed, data_path=None):
        return [Example(id=f"{split}-{i}", question="hi", answer="hi" * self.options.times) for i in range(size)]

    def to_prompt_canvas(self, example):
        return PromptCanvas(prompt=f"Echo {example.question}", pieces=(Piece(example.answer, False),))

    def check(self, example, output):
        return []

    def metrics(self, examples, outputs):
        return {}

    def example_from_input(self, text):
        return Example(id="input", question=text, answer="0" * len(text))


class FakeSudoku(EchoTask):
    name = "sudoku"
"""


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    """A distribution installed on sys.path whose entry points name a good task, a broken one and an impostor."""
    (tmp_path / "echo_plugin.py").write_text(PLUGIN)
    (tmp_path / "broken_plugin.py").write_text("import no_such_module_anywhere\n")
    dist = tmp_path / "echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [ftkit.tasks]
        echo = echo_plugin:EchoTask
        broken = broken_plugin:Task
        sudoku = echo_plugin:FakeSudoku
        misnamed = echo_plugin:EchoTask
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    known_tasks()  # the built-in modules are imported (and registered) before the registry is saved
    saved = dict(base._REGISTRY)
    monkeypatch.setattr(base, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(base, "_PLUGIN_ERRORS", {})
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


def test_an_entry_point_task_works_like_a_builtin(plugin_env):
    assert "echo" in known_tasks()
    task = make_task("echo", {"times": 2})
    assert task.build_dataset("train", 1, 0)[0].answer == "hihi"
    from ftkit.recipe import recipe_from_dict

    recipe = recipe_from_dict({"task": {"name": "echo", "options": {"times": 3}}})
    assert recipe.task.options == {"times": 3}
    # A broken plugin is reported when asked for, and never hides the others.
    with pytest.raises(KeyError, match=r"task 'broken' is installed but its plugin failed to load: .*ModuleNotFound"):
        get_task("broken")
    # A plugin cannot replace a built-in task.
    assert get_task("sudoku").__module__ == "ftkit.tasks.sudoku"
    assert "built-in" in base._PLUGIN_ERRORS["sudoku"]
    assert "misnamed" not in known_tasks() and "names the task 'echo'" in base._PLUGIN_ERRORS["misnamed"]


def test_input_parsing_is_the_tasks_own():
    sudoku = make_task("sudoku")
    puzzle = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
    ex = example_from_input(sudoku, puzzle)
    assert ex.question == puzzle and ex.meta["givens"] == 30
    assert example_from_input(make_task("protein"), "40").question == {"length": 40, "motif": []}

    class Mute:
        name = "mute"

    with pytest.raises(FtkitError, match="task 'mute' does not read raw input"):
        example_from_input(Mute(), "x")


def test_views_default_to_text_and_sudoku_draws_grids():
    assert isinstance(view_of(make_task("protein")), TextView)
    assert isinstance(view_of(make_task("code_infill")), TextView)
    assert isinstance(view_of(make_task("sudoku")), SudokuView)


def _result(task_name, char_tokenizer, text, frames_tokens, violations=()):
    """A GenerateResult built without a model: the task's example for `text`, frames from token lists."""
    task = make_task(task_name, {"mode": "scaffold"} if task_name == "protein" else {})
    ex = example_from_input(task, text)
    pc = task.to_prompt_canvas(ex)
    lay = layout_example(char_tokenizer, pc, 112, 512)
    cmap = _canvas_map(pc.pieces, lay.char_starts)
    frames = [_frame(char_tokenizer, tokens, cmap, f"step {i}") for i, tokens in enumerate(frames_tokens)]
    return GenerateResult(
        task_name=task_name,
        run_dir=Path("r"),
        example=ex,
        output=frames[-1].text,
        violations=list(violations),
        steps_used=1,
        steps_budget=1,
        forward_passes=1,
        tokens_per_forward=1.0,
        renoised_cells=0,
        weights="fine-tuned adapter",
        canvas_map=cmap,
        answer=frames[-1],
        view=view_of(task),
        frames=frames,
    )


def test_protein_trajectory_sheet_is_a_readable_grid_with_a_key(char_tokenizer):
    """Before: every frame side by side (16 frames of a 556-px text image made a 8896x96 strip). Now frames wrap
    into rows no wider than a screen, with the colour key below."""
    template = "MKT" + "_" * 24 + "GLL"
    ids = char_tokenizer("MKT" + "A" * 24 + "GLL", add_special_tokens=False).input_ids
    frames = [ids[:k] + [1] * (len(ids) - k) for k in range(0, len(ids) + 1, 2)]  # 16 frames
    result = _result("protein", char_tokenizer, template, frames)
    images = trajectory_images(result)
    sheet = contact_sheet(images, result.view.legend)
    assert len(images) == 16 and images[0].width < 700
    assert sheet.width <= 1600 and sheet.height > 4 * images[0].height  # 2 columns, 8 rows
    colours = {c for _, c in sheet.crop((0, sheet.height - 40, sheet.width, sheet.height)).getcolors(1 << 16)}
    assert CHANGED_FILL in colours and VIOLATION_FILL in colours  # the key's swatches


def test_sudoku_images_have_a_colour_key(char_tokenizer):
    puzzle = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
    ids = char_tokenizer(puzzle.replace("0", "1"), add_special_tokens=False).input_ids
    result = _result("sudoku", char_tokenizer, puzzle, [ids, ids])
    assert len(grid_cells(result.answer)) == 81
    sheet = contact_sheet(trajectory_images(result), result.view.legend)
    key = sheet.crop((0, sheet.height - 40, sheet.width, sheet.height))
    colours = {c for _, c in key.getcolors(1 << 16)}
    assert {GIVEN_FILL, CHANGED_FILL, VIOLATION_FILL} <= colours


def test_text_frames_show_tokens_past_the_pieces(char_tokenizer):
    cmap = _canvas_map((), [])
    ids = char_tokenizer("ab\nc", add_special_tokens=False).input_ids + [char_tokenizer.eos_token_id]
    frame = _frame(char_tokenizer, ids, cmap, "answer")
    assert frame.pieces == ["a", "b", "\n", "c", "·"] and frame.fixed == [False] * 5
    assert isinstance(Frame(["x"], [False], "l").text, str)
