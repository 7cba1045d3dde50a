"""Sudoku: 81-cell canvases, givens clamped, constraint checks on rows, columns and boxes.

Data: a seeded generator whose puzzles have unique solutions (checked with a solution-counting solver), difficulty
by number of givens (easy >= 40, medium 30-39, hard < 30), or the public `quizzes,solutions` CSV format (81 digits
per field, 0 or . for a blank).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.tasks.base import (
    PLACEHOLDER,
    Example,
    Piece,
    PromptCanvas,
    RewardParts,
    Violation,
    register,
    stratified_means,
)
from ftkit.tasks.view import (
    CHANGED_FILL,
    GIVEN_FILL,
    INK,
    RULE,
    UNKNOWN_CELL,
    VIOLATION_FILL,
    WHITE,
    Frame,
    changed,
    font,
)

DIGITS = "123456789"
UNITS: list[tuple[str, list[int]]] = (
    [(f"row {r + 1}", [r * 9 + c for c in range(9)]) for r in range(9)]
    + [(f"column {c + 1}", [r * 9 + c for r in range(9)]) for c in range(9)]
    + [
        (f"box {b + 1}", [(3 * (b // 3) + i) * 9 + 3 * (b % 3) + j for i in range(3) for j in range(3)])
        for b in range(9)
    ]
)
PEERS = [sorted({p for _, cells in UNITS if i in cells for p in cells} - {i}) for i in range(81)]


def difficulty(givens: int) -> str:
    return "easy" if givens >= 40 else "medium" if givens >= 30 else "hard"


def count_solutions(grid: list[int], limit: int = 2) -> int:
    """Number of solutions of `grid` (0 = blank), stopping at `limit`. Backtracking on the most constrained cell."""
    grid = list(grid)

    def candidates(i: int) -> set[int]:
        return set(range(1, 10)) - {grid[p] for p in PEERS[i]}

    def solve() -> int:
        best, best_c = -1, None
        for i in range(81):
            if grid[i] == 0:
                c = candidates(i)
                if best_c is None or len(c) < len(best_c):
                    best, best_c = i, c
                    if len(c) <= 1:
                        break
        if best < 0:
            return 1
        found = 0
        for d in best_c:
            grid[best] = d
            found += solve()
            if found >= limit:
                break
        grid[best] = 0
        return found

    return solve()


def random_solution(rng: random.Random) -> list[int]:
    """A uniformly shuffled valid grid: a pattern solution under random digit, row, column and band permutations."""

    def pattern(r: int, c: int) -> int:
        return (3 * (r % 3) + r // 3 + c) % 9

    def shuffled(seq):
        seq = list(seq)
        rng.shuffle(seq)
        return seq

    bands = shuffled(range(3))
    rows = [b * 3 + r for b in bands for r in shuffled(range(3))]
    stacks = shuffled(range(3))
    cols = [s * 3 + c for s in stacks for c in shuffled(range(3))]
    digits = shuffled(range(1, 10))
    return [digits[pattern(r, c)] for r in rows for c in cols]


def make_puzzle(rng: random.Random, target_givens: int) -> tuple[list[int], list[int]]:
    """Remove cells from a random solution while the puzzle stays uniquely solvable, down to `target_givens`."""
    solution = random_solution(rng)
    puzzle = list(solution)
    order = list(range(81))
    rng.shuffle(order)
    givens = 81
    for i in order:
        if givens <= target_givens:
            break
        keep = puzzle[i]
        puzzle[i] = 0
        if count_solutions(puzzle) != 1:
            puzzle[i] = keep
        else:
            givens -= 1
    return puzzle, solution


def grid_to_str(grid: list[int]) -> str:
    return "".join(str(d) for d in grid)


def parse_grid(text: str, where: str, blanks: bool) -> list[int]:
    text = text.strip()
    if len(text) != 81:
        raise FtkitError(f"{where}: expected 81 cells, got {len(text)}")
    allowed = set(DIGITS) | (set("0.") if blanks else set())
    bad = [ch for ch in text if ch not in allowed]
    if bad:
        raise FtkitError(f"{where}: invalid character {bad[0]!r} (allowed: {''.join(sorted(allowed))})")
    return [0 if ch in "0." else int(ch) for ch in text]


def load_csv(path: str | Path, limit: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Read `quizzes,solutions` rows. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FtkitError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise FtkitError(f"{path}:{line}: not UTF-8 text") from None
    out = []
    reader = csv.reader(text.splitlines())
    for lineno, row in enumerate(reader, start=1):
        if not row or (lineno == 1 and not row[0].strip()[:1].isdigit() and row[0].strip()[:1] != "."):
            continue  # header or blank line
        if len(row) < 2:
            raise FtkitError(f"{path}:{lineno}: expected `quiz,solution`, got {len(row)} field(s)")
        quiz = parse_grid(row[0], f"{path}:{lineno}: quiz", blanks=True)
        sol = parse_grid(row[1], f"{path}:{lineno}: solution", blanks=False)
        if any(q and q != s for q, s in zip(quiz, sol)):
            raise FtkitError(f"{path}:{lineno}: the solution contradicts a given of the quiz")
        out.append((quiz, sol))
        if limit is not None and len(out) >= limit:
            break
    return out


def write_csv(path: str | Path, pairs: list[tuple[list[int], list[int]]]) -> None:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["quizzes", "solutions"])
        for quiz, sol in pairs:
            writer.writerow([grid_to_str(quiz), grid_to_str(sol)])


INPUT_SEPARATORS = set(" \t\r\n|+-_,;")  # ignored in a typed puzzle: whitespace and grid-drawing characters


def grid_cells(frame: Frame) -> list[str]:
    """The 81 cells of a frame (its first 81 pieces that are not the layout's newlines)."""
    return [p for p in frame.pieces if p != "\n"][:81]


def _cell_indices(frame: Frame, pieces: set[int]) -> set[int]:
    """Piece indices -> cell indices."""
    out, cell = set(), 0
    for i, p in enumerate(frame.pieces):
        if p == "\n":
            continue
        if i in pieces:
            out.add(cell)
        cell += 1
    return out


def sudoku_grid_text(
    cells: list[str], givens: list[bool], changed: set[int] | None = None, bad: set[int] | None = None
):
    """A 9×9 rich Text grid with box rules: givens bold cyan, changed cells yellow, violating cells red."""
    from rich.text import Text

    changed, bad = changed or set(), bad or set()
    text = Text()
    for r in range(9):
        if r and r % 3 == 0:
            text.append("──────┼───────┼──────\n", style="dim")
        for c in range(9):
            i = r * 9 + c
            if c and c % 3 == 0:
                text.append("│ ", style="dim")
            style = "bold cyan" if givens[i] else "red" if i in bad else "bold yellow" if i in changed else ""
            text.append(cells[i] if i < len(cells) and cells[i] else UNKNOWN_CELL, style=style)
            text.append(" " if c < 8 else "")
        text.append("\n" if r < 8 else "")
    return text


class SudokuView:
    """Sudoku answers and frames as 9×9 grids (terminal and images), givens, changes and violations coloured."""

    legend = (
        (GIVEN_FILL, "given (clamped)"),
        (CHANGED_FILL, "changed this step"),
        (VIOLATION_FILL, "violates a constraint (answer)"),
    )

    @staticmethod
    def _givens(example: Example) -> list[bool]:
        return [q != "0" for q in example.question]

    def answer(self, example: Example, output: str, frame: Frame, bad: set[int]):
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        grid = sudoku_grid_text(grid_cells(frame), self._givens(example), bad=_cell_indices(frame, bad))
        key = Text.from_markup("[bold cyan]givens[/] · generated · [red]violating[/]", style="dim")
        return Group(Panel.fit(grid, title="answer"), key)

    def frame(self, example: Example, frame: Frame, previous: Frame | None):
        from rich.panel import Panel

        moved = _cell_indices(frame, changed(previous, frame))
        return Panel.fit(sudoku_grid_text(grid_cells(frame), self._givens(example), changed=moved), title=frame.label)

    def image(self, example: Example, frame: Frame, previous: Frame | None, bad: set[int]):
        from PIL import Image, ImageDraw

        cell, pad, header = 22, 8, 18
        img = Image.new("RGB", (9 * cell + 2 * pad, 9 * cell + 2 * pad + header), WHITE)
        draw = ImageDraw.Draw(img)
        face = font(14)
        draw.text((pad, 2), frame.label, fill=INK, font=face)
        cells, givens = grid_cells(frame), self._givens(example)
        moved, wrong = _cell_indices(frame, changed(previous, frame)), _cell_indices(frame, bad)
        x0, y0 = pad, pad + header
        for i, value in enumerate(cells):
            r, c = divmod(i, 9)
            box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell, y0 + (r + 1) * cell)
            fill = GIVEN_FILL if givens[i] else VIOLATION_FILL if i in wrong else CHANGED_FILL if i in moved else WHITE
            draw.rectangle(box, fill=fill, outline=RULE)
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), value, fill=INK, font=face, anchor="mm")
        for k in range(0, 10, 3):
            draw.line((x0 + k * cell, y0, x0 + k * cell, y0 + 9 * cell), fill=INK, width=2)
            draw.line((x0, y0 + k * cell, x0 + 9 * cell, y0 + k * cell), fill=INK, width=2)
        return img


@dataclass(frozen=True)
class SudokuOptions:
    min_givens: int = 28
    max_givens: int = 50
    # Canvas layout: 81 digits, or 9 lines of 9 digits (the newlines are fixed, the model sees rows).
    rows_on_lines: bool = False


@register
class SudokuTask:
    name = "sudoku"
    Options = SudokuOptions
    view = SudokuView()

    def __init__(self, options: SudokuOptions | None = None):
        self.options = options or SudokuOptions()
        if not 17 <= self.options.min_givens <= self.options.max_givens <= 81:
            raise FtkitError("task.options: need 17 <= min_givens <= max_givens <= 81")

    # -- data
    def build_dataset(self, split: str, size: int, seed: int, data_path: str | None = None) -> list[Example]:
        """`train` / `test`, or `all`: every puzzle of `data_path` (`ftkit eval --data`)."""
        if split == "all" and not data_path:
            raise FtkitError("sudoku: split 'all' reads a data file (--data FILE)")
        if data_path:
            pairs = load_csv(data_path)
            # A deterministic split of user data: every 10th row is test.
            if split != "all":
                pairs = [p for i, p in enumerate(pairs) if (i % 10 == 9) == (split == "test")]
            pairs = pairs[:size]
        elif split == "test" and seed == 0 and size <= len(_held_out()):
            pairs = _held_out()[:size]
        else:
            # Separate streams for train and test so they never share a puzzle.
            rng = random.Random(f"sudoku/{split}/{seed}")
            pairs = [
                make_puzzle(rng, rng.randint(self.options.min_givens, self.options.max_givens)) for _ in range(size)
            ]
        if not pairs and size:
            raise FtkitError(f"sudoku: no {split} examples{' in ' + data_path if data_path else ''}")
        return [self._example(f"{split}-{i}", quiz, sol) for i, (quiz, sol) in enumerate(pairs)]

    def _example(self, id_: str, quiz: list[int], sol: list[int]) -> Example:
        givens = sum(1 for q in quiz if q)
        return Example(
            id=id_,
            question=grid_to_str(quiz),
            answer=self._format(grid_to_str(sol)),
            meta={"givens": givens, "difficulty": difficulty(givens)},
        )

    def _format(self, cells: str) -> str:
        if not self.options.rows_on_lines:
            return cells
        return "\n".join(cells[r * 9 : r * 9 + 9] for r in range(9))

    def _cells(self, output: str) -> str:
        return output.replace("\n", "") if self.options.rows_on_lines else output

    def _cell_offset(self, cell: int) -> int:
        return cell + (cell // 9 if self.options.rows_on_lines else 0)

    def to_prompt_canvas(self, example: Example) -> PromptCanvas:
        quiz = example.question
        pieces = []
        for i, (q, a) in enumerate(zip(quiz, self._cells(example.answer))):
            if self.options.rows_on_lines and i and i % 9 == 0:
                pieces.append(Piece("\n", True))
            # A blank cell may only become a digit (the sampler masks every other token there).
            pieces.append(Piece(q, True) if q != "0" else Piece(a, False, allowed=DIGITS))
        prompt = "Solve the Sudoku. Blanks are 0.\n" + self._format(quiz)
        return PromptCanvas(prompt=prompt, pieces=tuple(pieces))

    def example_from_input(self, text: str) -> Example:
        """81 cells, digits 1-9 with 0 or . for blanks; whitespace and grid-drawing characters (| + - _ , ;) are
        ignored, so a drawn grid works."""
        cells = "".join(ch for ch in text if ch not in INPUT_SEPARATORS)
        grid = parse_grid(cells, "sudoku input", blanks=True)
        for unit, idx in UNITS:
            seen: dict[int, int] = {}
            for i in idx:
                if grid[i] and grid[i] in seen:
                    raise FtkitError(
                        f"sudoku input: the givens repeat {grid[i]} in {unit} (cells {seen[grid[i]] + 1} "
                        f"and {i + 1}, counting row by row): no solution exists"
                    )
                seen.setdefault(grid[i], i)
        givens = sum(1 for d in grid if d)
        quiz = grid_to_str(grid)
        # The answer is unknown: blanks keep the placeholder (one token, like a digit); the sampler ignores it.
        answer = self._format(quiz.replace("0", PLACEHOLDER))
        return Example(
            id="input", question=quiz, answer=answer, meta={"givens": givens, "difficulty": difficulty(givens)}
        )

    # -- checking
    def check(self, example: Example, output: str) -> list[Violation]:
        cells = self._cells(output)
        out: list[Violation] = []
        if len(cells) != 81:
            out.append(Violation("length", f"expected 81 cells, got {len(cells)}"))
        cells = (cells + "?" * 81)[:81]
        bad = tuple(self._cell_offset(i) for i, ch in enumerate(cells) if ch not in DIGITS)
        if bad:
            out.append(Violation("alphabet", f"{len(bad)} cell(s) are not digits 1-9", bad))
        changed = tuple(self._cell_offset(i) for i, q in enumerate(example.question) if q != "0" and cells[i] != q)
        if changed:
            out.append(Violation("givens", f"{len(changed)} given(s) changed", changed))
        for unit, idx in UNITS:
            seen: dict[str, list[int]] = {}
            for i in idx:
                if cells[i] in DIGITS:
                    seen.setdefault(cells[i], []).append(i)
            dup = [i for ds in seen.values() if len(ds) > 1 for i in ds]
            if dup:
                kind = unit.split()[0]
                # Re-noise only the non-given cells of the clash: givens are right by definition.
                free = tuple(self._cell_offset(i) for i in dup if example.question[i] == "0")
                out.append(Violation(kind, f"{unit} repeats a digit", free))
        return out

    def reward(self, example: Example, output: str) -> RewardParts:
        """`satisfied`: the mean over the 27 units of (distinct digits 1-9 in the unit) / 9, with a changed given
        counting as no digit. It needs no solution, is 1 exactly for a valid grid, and credits every repeat removed
        (the all-or-nothing unit validity would give a weak model no signal)."""
        cells = (self._cells(output) + "?" * 81)[:81]
        cells = "".join(c if q == "0" or c == q else "?" for c, q in zip(cells, example.question))
        distinct = [len({cells[i] for i in idx} & set(DIGITS)) / 9 for _, idx in UNITS]
        return RewardParts(sum(distinct) / len(distinct), float(not self.check(example, output)))

    def metrics(self, examples: list[Example], outputs: list[str]) -> dict[str, float]:
        rows = [
            (self._one(ex, out), ex.meta.get("difficulty") or difficulty(ex.meta.get("givens", 0)))
            for ex, out in zip(examples, outputs)
        ]
        return stratified_means(rows, ["easy", "medium", "hard"]) if rows else {}

    def _one(self, example: Example, output: str) -> dict[str, float]:
        produced = self._cells(output)
        cells = (produced + "?" * 81)[:81]  # per-cell metrics read the first 81 cells
        truth = self._cells(example.answer)
        quiz = example.question
        blanks = [i for i in range(81) if quiz[i] == "0"]
        givens = [i for i in range(81) if quiz[i] != "0"]
        units_ok = {"row": 0, "column": 0, "box": 0}
        for unit, idx in UNITS:
            vals = [cells[i] for i in idx]
            if sorted(vals) == list(DIGITS):
                units_ok[unit.split()[0]] += 1
        return {
            "solve_rate": float(not self.check(example, output)),
            # The whole output, not its first 81 cells: extra cells after a right grid are not an exact match.
            "exact_match": float(produced == truth),
            "cell_accuracy_blanks": sum(cells[i] == truth[i] for i in blanks) / max(1, len(blanks)),
            "givens_preserved": sum(cells[i] == quiz[i] for i in givens) / max(1, len(givens)),
            "rows_valid": units_ok["row"] / 9,
            "columns_valid": units_ok["column"] / 9,
            "boxes_valid": units_ok["box"] / 9,
        }


_HELD_OUT: list[tuple[list[int], list[int]]] | None = None
HELD_OUT_FILE = Path(__file__).resolve().parent.parent / "data" / "sudoku_test.csv"


def _held_out() -> list[tuple[list[int], list[int]]]:
    """The committed held-out test set (generated once with a seed disjoint from training, see data/README)."""
    global _HELD_OUT
    if _HELD_OUT is None:
        _HELD_OUT = load_csv(HELD_OUT_FILE) if HELD_OUT_FILE.is_file() else []
    return _HELD_OUT
