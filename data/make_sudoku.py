"""Sudoku puzzles of a chosen difficulty as a `quizzes,solutions` CSV, for `ftkit eval RUN --data FILE`.

    python data/make_sudoku.py                    # -> data/sudoku_58-68.csv (400 puzzles, 58-68 givens, seed 0)
    python data/make_sudoku.py --min-givens 40 --max-givens 55 --rows 200 --out /tmp/easy.csv

The built-in task evaluates on one committed held-out set of mixed difficulty (`ftkit/data/sudoku_test.csv`,
28-55 givens). `recipes/quickstart_rl.yaml` runs RL on easier puzzles, where the quickstart model solves some;
this file is the held-out set of that difficulty. Puzzles come from the task's own generator (unique solutions),
on a random stream of their own, so they share no puzzle with a recipe's training split in practice; the script
checks that against the training split of the recipe's options (`--check-against-train N`, default 8,000).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ftkit.tasks.sudoku import SudokuOptions, SudokuTask, grid_to_str, make_puzzle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-givens", type=int, default=58)
    parser.add_argument("--max-givens", type=int, default=68)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check-against-train",
        type=int,
        default=8000,
        metavar="N",
        help="fail if a puzzle is among the first N of the task's training split (seed 0) with "
        "these givens; 0 skips the check",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not 17 <= args.min_givens <= args.max_givens <= 81:
        parser.error("need 17 <= --min-givens <= --max-givens <= 81 (17 is the fewest givens of a unique Sudoku)")
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    out = args.out or Path(__file__).resolve().parent / f"sudoku_{args.min_givens}-{args.max_givens}.csv"

    rng = random.Random(f"make_sudoku/{args.min_givens}-{args.max_givens}/{args.seed}")
    pairs = [make_puzzle(rng, rng.randint(args.min_givens, args.max_givens)) for _ in range(args.rows)]
    if args.check_against_train:
        task = SudokuTask(SudokuOptions(min_givens=args.min_givens, max_givens=args.max_givens))
        train = {ex.question for ex in task.build_dataset("train", args.check_against_train, 0)}
        shared = [i for i, (quiz, _) in enumerate(pairs) if grid_to_str(quiz) in train]
        if shared:
            raise SystemExit(f"{len(shared)} puzzle(s) also in the training split (first: row {shared[0] + 1})")
    lines = ["quizzes,solutions"] + [f"{grid_to_str(q)},{grid_to_str(s)}" for q, s in pairs]
    partial = out.with_name(out.name + ".partial")  # a killed run leaves no half-written CSV under the real name
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(out)
    print(f"{out}: {len(pairs)} puzzles, {args.min_givens}-{args.max_givens} givens")


if __name__ == "__main__":
    main()
