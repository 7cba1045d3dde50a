"""Constrained decoding before/after, per task: base and tuned model, token masks on and off, plain sampling,
verifier-guided re-noising and plain best-of-n at the verifier row's decoder forwards (docs/constrained-decoding.md).

Trains each task's tiny recipe if its run directory holds no finished run, then runs the four evaluations
`ftkit eval RUN [--base] --compare-verifier [--no-token-masks]` (each writes its own file into the run) and prints
one markdown table per task with the task's metrics and the decoder forwards per example of every row.

    python bench/constrained_decoding.py                      # sudoku protein code_infill
    python bench/constrained_decoding.py sudoku --runs runs   # runs/tiny-sudoku, trained if missing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ("sudoku", "protein", "code_infill")
# The metrics each table shows (the task's format, then its constraints, then success).
COLUMNS = {
    "sudoku": ("givens_preserved", "cell_accuracy_blanks", "rows_valid", "columns_valid", "boxes_valid", "solve_rate"),
    "protein": ("validity", "length_exact", "canonical_fraction", "fixed_preserved", "low_complexity_free"),
    "code_infill": ("prefix_suffix_preserved", "parse_rate", "compile_rate", "exact_match"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tasks", nargs="*", default=list(TASKS), help=f"any of {', '.join(TASKS)} (default: all)")
    p.add_argument("--runs", default="runs", help="folder of the runs (RUNS/tiny-TASK, as the tiny recipes name them)")
    args = p.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    return args


def ensure_trained(task: str, runs: Path) -> Path:
    from ftkit.recipe import load_recipe
    from ftkit.sft.run import train

    run_dir = runs / f"tiny-{task}"
    if not (run_dir / "summary.json").is_file():
        recipe = load_recipe(f"recipes/tiny/{task}.yaml", overrides=[f"train.output_dir={run_dir}"])
        train(recipe, resume=run_dir.exists(), progress=False)
    return run_dir


def rows(run_dir: Path) -> list[tuple[str, str, str, dict, float]]:
    from ftkit.evaluation import EvalRequest, evaluate_run

    out = []
    for model, base in (("base", True), ("tuned", False)):
        for masks in (False, True):
            report = evaluate_run(EvalRequest(run_dir, base_only=base, compare_verifier=True, token_masks=masks))
            for mode, result in report["modes"].items():
                out.append(
                    (model, "on" if masks else "off", mode, result["metrics"], result["decoder_forwards_per_example"])
                )
    return out


def table(task: str, found: list[tuple[str, str, str, dict, float]]) -> str:
    cols = [c for c in COLUMNS[task] if any(c in m for *_, m, _ in found)]
    lines = [
        "| model | masks | mode | " + " | ".join(cols) + " | fwd/example |",
        "|---|---|---|" + "---:|" * (len(cols) + 1),
    ]
    for model, masks, mode, metrics, forwards in found:
        cells = [f"{100 * metrics[c]:.1f}%" if c in metrics else "" for c in cols]
        lines.append(f"| {model} | {masks} | {mode} | " + " | ".join(cells) + f" | {forwards:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = Path(args.runs)
    results = {}
    for task in args.tasks:
        run_dir = ensure_trained(task, runs)
        found = rows(run_dir)
        results[task] = [dict(zip(("model", "masks", "mode", "metrics", "forwards"), r)) for r in found]
        print(f"\n### {task}  ({run_dir})\n\n{table(task, found)}\n", flush=True)
    out = runs / "constrained_decoding.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"all rows: {out}")


if __name__ == "__main__":
    main()
