import random
import subprocess
import sys
from pathlib import Path

import pytest

from ftkit.diffusion.token_layout import layout_example
from ftkit.errors import FtkitError
from ftkit.tasks import get_task, known_tasks
from ftkit.tasks.sudoku import (
    HELD_OUT_FILE,
    SudokuOptions,
    SudokuTask,
    count_solutions,
    difficulty,
    load_csv,
    make_puzzle,
    random_solution,
)

QUIZ = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


@pytest.fixture
def task():
    return SudokuTask()


@pytest.fixture
def example(task):
    return task._example("x", [int(c) for c in QUIZ], [int(c) for c in SOLUTION])


def swap(s: str, i: int, j: int) -> str:
    chars = list(s)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def test_registered_and_unknown_name():
    assert "sudoku" in known_tasks() and get_task("sudoku") is SudokuTask
    with pytest.raises(KeyError, match="unknown task 'chess'; known tasks: chat, code_infill, protein, sudoku"):
        get_task("chess")


def test_golden_solution_has_no_violations_and_scores_100(task, example):
    assert task.check(example, SOLUTION) == []
    m = task.metrics([example], [SOLUTION])
    for key in (
        "solve_rate",
        "exact_match",
        "cell_accuracy_blanks",
        "givens_preserved",
        "rows_valid",
        "columns_valid",
        "boxes_valid",
    ):
        assert m[key] == 1.0, key
    assert QUIZ.count("0") == 51 and example.meta["difficulty"] == "medium"  # 30 givens
    assert m["count/medium"] == 1.0 and "count/easy" not in m


def names(violations):
    return {v.constraint for v in violations}


def test_every_constraint_violated(task, example):
    assert names(task.check(example, SOLUTION[:80])) >= {"length"}
    assert names(task.check(example, "x" + SOLUTION[1:])) >= {"alphabet"}
    # Changing a given (cell 0 is a given 5) breaks givens and its row/column/box.
    changed = "6" + SOLUTION[1:]
    assert {"givens", "row", "column", "box"} <= names(task.check(example, changed))
    # Swapping two blanks within a row keeps the row valid but breaks their columns (and boxes here).
    row_ok = swap(SOLUTION, 2, 3)  # cells (0,2) and (0,3) are both blanks in QUIZ
    assert QUIZ[2] == QUIZ[3] == "0"
    v = task.check(example, row_ok)
    assert "row" not in names(v) and "column" in names(v)
    # A row clash only: duplicate within row 0, positions of the free cell reported (givens are not re-noised).
    row_clash = SOLUTION[:2] + "3" + SOLUTION[3:]  # cell 2 (blank) becomes 3, the given at cell 1
    clash = [x for x in task.check(example, row_clash) if x.constraint == "row"]
    assert clash and 2 in clash[0].positions and 1 not in clash[0].positions


def test_partial_credit_metrics(task, example):
    wrong = swap(SOLUTION, 2, 3)
    m = task.metrics([example], [wrong])
    assert m["solve_rate"] == 0.0 and m["exact_match"] == 0.0
    blanks = QUIZ.count("0")
    assert m["cell_accuracy_blanks"] == pytest.approx((blanks - 2) / blanks)
    assert m["rows_valid"] == 1.0 and m["columns_valid"] == pytest.approx(7 / 9)
    assert m["givens_preserved"] == 1.0


def test_an_output_longer_than_81_cells_is_not_an_exact_match(task, example):
    """A right grid followed by extra digits fails `check` (length), so it must not count as an exact match."""
    longer = SOLUTION + "1"
    assert "length" in names(task.check(example, longer))
    m = task.metrics([example], [longer])
    assert m["exact_match"] == 0.0 and m["solve_rate"] == 0.0
    assert m["cell_accuracy_blanks"] == 1.0  # the per-cell metrics still read the first 81 cells


def test_generator_makes_unique_puzzles_by_difficulty():
    rng = random.Random(5)
    sol = random_solution(rng)
    assert count_solutions(sol) == 1 and sorted(sol[:9]) == list(range(1, 10))
    puzzle, solution = make_puzzle(rng, 35)
    assert count_solutions(puzzle) == 1
    assert all(p in (0, s) for p, s in zip(puzzle, solution))
    assert 35 <= sum(1 for p in puzzle if p) <= 40
    assert (difficulty(45), difficulty(35), difficulty(25)) == ("easy", "medium", "hard")


def test_train_and_test_are_disjoint_and_seeded(task):
    train = task.build_dataset("train", 20, seed=1)
    again = task.build_dataset("train", 20, seed=1)
    test = task.build_dataset("test", 20, seed=1)
    assert [e.question for e in train] == [e.question for e in again]
    assert not {e.question for e in train} & {e.question for e in test}


def test_held_out_file_is_committed_and_valid():
    pairs = load_csv(HELD_OUT_FILE)
    assert len(pairs) == 200
    assert {difficulty(sum(1 for x in q if x)) for q, _ in pairs[:50]} == {"easy", "medium", "hard"}
    for quiz, _sol in pairs[:5]:
        assert count_solutions(quiz) == 1


def test_the_rl_recipes_easier_held_out_file_matches_its_script(tmp_path):
    """data/sudoku_58-68.csv (the in-distribution held-out set of recipes/quickstart_rl.yaml) is what
    data/make_sudoku.py writes: unique-solution puzzles of 58-68 givens, none in the recipe's training split."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "easy.csv"
    subprocess.run(
        [sys.executable, str(root / "data" / "make_sudoku.py"), "--out", str(out)], check=True, capture_output=True
    )
    assert out.read_bytes() == (root / "data" / "sudoku_58-68.csv").read_bytes()
    pairs = load_csv(out)
    assert len(pairs) == 400
    assert all(58 <= sum(1 for x in q if x) <= 68 for q, _ in pairs)
    for quiz, _ in pairs[:5]:
        assert count_solutions(quiz) == 1


def test_csv_errors_name_file_and_line(tmp_path):
    good = f"quizzes,solutions\n{QUIZ},{SOLUTION}\n"
    p = tmp_path / "p.csv"
    p.write_text(good + f"{QUIZ[:80]},{SOLUTION}\n")
    with pytest.raises(FtkitError, match=r"p\.csv:3: quiz: expected 81 cells, got 80"):
        load_csv(p)
    p.write_text(good + f"{QUIZ},{SOLUTION[:-1]}x\n")
    with pytest.raises(FtkitError, match=r"p\.csv:3: solution: invalid character 'x'"):
        load_csv(p)
    p.write_text(good + f"{QUIZ}\n")
    with pytest.raises(FtkitError, match=r"p\.csv:3: expected `quiz,solution`"):
        load_csv(p)
    p.write_text(good + f"6{QUIZ[1:]},{SOLUTION}\n")
    with pytest.raises(FtkitError, match=r"p\.csv:3: the solution contradicts a given"):
        load_csv(p)
    p.write_text(good.replace(".", "") + f"{QUIZ.replace('0', '.')},{SOLUTION}\n")
    assert len(load_csv(p)) == 2  # '.' blanks are accepted


def test_layout_fixes_the_givens(task, example, char_tokenizer):
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(example), canvas_length=96, max_prompt_length=256)
    assert lay.content_length == 82  # 81 cells + the end-of-turn token
    assert [f for f in lay.fixed[:82]] == [q != "0" for q in QUIZ] + [False]
    assert char_tokenizer.decode(lay.canvas_ids[:81]) == SOLUTION


def test_rows_on_lines_layout(char_tokenizer):
    task = SudokuTask(SudokuOptions(rows_on_lines=True))
    ex = task._example("x", [int(c) for c in QUIZ], [int(c) for c in SOLUTION])
    pc = task.to_prompt_canvas(ex)
    assert pc.canvas_text == ex.answer and ex.answer.count("\n") == 8
    assert task.check(ex, ex.answer) == []
    assert task.metrics([ex], [ex.answer])["solve_rate"] == 1.0
