"""The headline metric against training steps and wall time: a change that slows learning shows up here.

Trains a recipe (default: the quickstart, recipes/quickstart.yaml) with a checkpoint every `--every` steps, then
evaluates the untrained base (step 0) and every checkpoint with `ftkit eval` on the same held-out examples, and
prints a table (step, seconds, canvas tokens, train loss, metrics), beside the chance level where one is known.
Writes OUT/learning_curve.json and OUT/learning_curve.png (metric vs steps and vs seconds); the run itself is in
OUT/run (its eval_checkpoint-N.json files hold every metric).

    python bench/learning_curve.py                                  # the quickstart, checkpoints every 100 steps
    python bench/learning_curve.py recipes/quickstart.yaml train.max_steps=400 --every 50 -o runs/lc
    python bench/learning_curve.py --eval-only -o runs/lc           # re-evaluate an existing run's checkpoints

Seconds are training wall time at each checkpoint (data and model set-up excluded), so they depend on the machine
and its load; CPU seconds (all threads) much less so; steps and canvas tokens not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

DEFAULT_RECIPE = "recipes/quickstart.yaml"
DEFAULT_METRICS = ("cell_accuracy_blanks/easy", "rows_valid/easy", "solve_rate/easy", "cell_accuracy_blanks")
# Uniformly random digits: 1/9 of the blanks right; a row of k blanks is valid with probability k!/9^k (~0).
CHANCE = {
    "cell_accuracy_blanks": 1 / 9,
    "rows_valid": 0.0,
    "columns_valid": 0.0,
    "boxes_valid": 0.0,
    "solve_rate": 0.0,
    "exact_match": 0.0,
}
TIMES_FILE = "checkpoint_seconds.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE)
    p.add_argument("overrides", nargs="*", help="recipe overrides KEY.PATH=VALUE")
    p.add_argument("-o", "--out", default="runs/learning-curve", help="output folder (the run goes to OUT/run)")
    p.add_argument("--every", type=int, default=100, help="checkpoint (and evaluate) every N optimizer steps")
    p.add_argument(
        "-n", "--num-examples", type=int, default=None, help="held-out examples (default: eval.num_examples)"
    )
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma list; the first is the headline")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints of an existing OUT/run")
    args = p.parse_args(argv)
    if "=" in args.recipe and not Path(args.recipe).exists():  # overrides only: the default recipe
        args.recipe, args.overrides = DEFAULT_RECIPE, [args.recipe, *args.overrides]
    return args


class CheckpointClock(TrainerCallback):
    """Training wall and CPU seconds (all threads of the process) at each checkpoint save, written to `path` as
    {step: [wall, cpu]}. On a shared machine wall time inflates; CPU time much less."""

    def __init__(self, path: Path):
        self.path, self.times, self.start = path, {}, (0.0, 0.0)

    def on_train_begin(self, args, state, control, **kw):
        self.start = (time.perf_counter(), time.process_time())

    def on_save(self, args, state, control, **kw):
        self.times[str(state.global_step)] = [
            round(time.perf_counter() - self.start[0], 2),
            round(time.process_time() - self.start[1], 2),
        ]
        self.path.write_text(json.dumps(self.times, indent=1))


def train_with_checkpoints(recipe_path: str, overrides: list[str], run_dir: Path, every: int) -> None:
    from ftkit.recipe import load_recipe
    from ftkit.sft.run import train

    probe = load_recipe(recipe_path, overrides)
    keep = probe.train.max_steps // every + 1
    recipe = load_recipe(
        recipe_path,
        [*overrides, f"train.output_dir={run_dir}", f"train.save_steps={every}", f"train.save_total_limit={keep}"],
    )
    train(recipe, progress=False, extra_callbacks=[CheckpointClock(run_dir.parent / TIMES_FILE)])


def checkpoint_steps(run_dir: Path) -> list[int]:
    from ftkit.run.paths import RunPaths

    root = RunPaths(run_dir).checkpoints
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit())


def evaluate_points(run_dir: Path, num_examples: int | None) -> list[dict]:
    """Step 0 (the untrained base) and every checkpoint, on the same examples and seeds."""
    from ftkit.evaluation import EvalRequest, evaluate_run
    from ftkit.recipe import load_recipe
    from ftkit.run import rundir
    from ftkit.run.paths import RunPaths

    recipe = load_recipe(RunPaths(run_dir).recipe)
    times = {}
    if (run_dir.parent / TIMES_FILE).is_file():
        times = {int(k): v for k, v in json.loads((run_dir.parent / TIMES_FILE).read_text()).items()}
    times[0] = [0.0, 0.0]
    losses = {r["step"]: r["loss"] for r in rundir.read_jsonl(RunPaths(run_dir).train_log) if "loss" in r}
    tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * recipe.model.tiny.canvas_length
    points = []
    for step in [0, *checkpoint_steps(run_dir)]:
        report = (
            evaluate_run(EvalRequest(run_dir, num_examples=num_examples, base_only=True))
            if step == 0
            else evaluate_run(EvalRequest(run_dir, num_examples=num_examples, checkpoint=f"checkpoint-{step}"))
        )
        logged = [s for s in losses if s <= step]
        points.append(
            {
                "step": step,
                "seconds": times.get(step, [None])[0],
                "cpu_seconds": times.get(step, [None, None])[1],
                "canvas_tokens": step * tokens_per_step if recipe.is_random_init else None,
                "train_loss": losses[max(logged)] if logged and step else None,
                "metrics": report["metrics"],
            }
        )
        print(f"evaluated step {step}", file=sys.stderr, flush=True)
    return points


def chance(metric: str) -> float | None:
    return CHANCE.get(metric.split("/")[0])


def print_table(points: list[dict], metrics: list[str]) -> None:
    head = ["step", "seconds", "cpu s", "canvas tok", "train loss", *metrics]
    rows = [head]
    for p in points:
        rows.append(
            [
                str(p["step"]),
                "-" if p["seconds"] is None else f"{p['seconds']:.0f}",
                "-" if p["cpu_seconds"] is None else f"{p['cpu_seconds']:.0f}",
                "-" if p["canvas_tokens"] is None else f"{p['canvas_tokens']:,}",
                "-" if p["train_loss"] is None else f"{p['train_loss']:.3f}",
                *[f"{100 * p['metrics'][m]:.1f}%" if m in p["metrics"] else "-" for m in metrics],
            ]
        )
    rows.append(
        ["chance", "", "", "", "", *[("-" if chance(m) is None else f"{100 * chance(m):.1f}%") for m in metrics]]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    run_dir = out / "run"
    metrics = [m for m in args.metrics.split(",") if m]
    if not args.eval_only:
        out.mkdir(parents=True, exist_ok=True)
        train_with_checkpoints(args.recipe, args.overrides, run_dir, args.every)
    elif not run_dir.is_dir():
        sys.exit(f"error: {run_dir}: no run to evaluate (drop --eval-only to train one)")
    points = evaluate_points(run_dir, args.num_examples)
    from ftkit.run.plots import plot_learning_curve
    from ftkit.run.rundir import atomic_write_json

    atomic_write_json(out / "learning_curve.json", {"run_dir": str(run_dir), "metrics": metrics, "points": points})
    plot_learning_curve(points, out / "learning_curve.png", metrics, {m: chance(m) for m in metrics})
    print_table(points, metrics)
    print(f"\n{out / 'learning_curve.json'}, {out / 'learning_curve.png'}")


if __name__ == "__main__":
    main()
