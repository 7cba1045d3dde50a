"""The README's and docs' learning figures over several seeds: mean ± spread, and what a thread count changes.

One run of one seed is not a result: a float path (1 thread or 2, AVX-512 or AVX2) or a seed moves a small model's
numbers by several points. This script reruns each figure with `ftkit` itself, as a user would, once per seed (and
per thread count), and prints one table row per metric: the mean, the sample standard deviation, the range and
every value.

    python bench/seeds.py chat --seeds 0,1,2                        # the tiny chat recipe (README, "Your own data")
    python bench/seeds.py quickstart --seeds 0,1,2                  # the quickstart (README, "What to expect")
    python bench/seeds.py rl --seeds 0,1,2                          # quickstart_rl's gain (needs the quickstart runs)
    python bench/seeds.py chat --seeds 0,1,2 --threads 1,2          # the same seeds at 1 and at 2 threads
    python bench/seeds.py chat --table                              # print the table of what OUT holds

Figures:
  quickstart  ftkit train recipes/quickstart.yaml, then `ftkit eval RUN` and `ftkit eval RUN --base` (100 held-out
              puzzles); ~7 min per seed at 2 threads on a quiet 2-vCPU machine.
  chat        ftkit train recipes/tiny/chat.yaml (data/arithmetic.jsonl from `python data/make_arithmetic.py`, made
              here when missing), then `ftkit eval RUN` and `--base`; 319-1,571 s of training per seed at 1 thread
              on a 2-vCPU machine, depending on its load.
  rl          ftkit rl recipes/quickstart_rl.yaml on the quickstart run of the same seed and threads (run
              `quickstart` first), then `ftkit eval --data data/sudoku_58-68.csv` of both; the gain is after - before
              on the same 400 puzzles; ~21 min per seed.

A seed sets train.seed (noise draws, data order) and, for a random-init preset, model.tiny.init_seed (the base
itself): a different run, as a user with another seed would get. The held-out examples and eval.seed stay fixed, so
the spread is that of training. A thread count is `train.cpu_threads` (train and eval) and OMP_NUM_THREADS.

Everything goes to OUT (default runs/seeds): OUT/<figure>-t<threads>-s<seed>/ is a run directory, and a run whose
evaluation files are already there is not redone, so an interrupted sweep continues where it stopped. The table is
also written to OUT/seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUDOKU_METRICS = (
    "cell_accuracy_blanks/easy",
    "rows_valid/easy",
    "columns_valid/easy",
    "boxes_valid/easy",
    "cell_accuracy_blanks",
    "solve_rate",
)
CHAT_METRICS = ("answer_found", "verified")
RL_METRICS = ("cell_accuracy_blanks", "rows_valid", "columns_valid", "boxes_valid", "solve_rate")
RL_DATA = "data/sudoku_58-68.csv"


@dataclass(frozen=True)
class Figure:
    name: str
    recipe: str
    metrics: tuple[str, ...]
    tiny: bool  # a random-init preset: the seed also picks the base


FIGURES = {
    "quickstart": Figure("quickstart", "recipes/quickstart.yaml", SUDOKU_METRICS, tiny=True),
    "chat": Figure("chat", "recipes/tiny/chat.yaml", CHAT_METRICS, tiny=True),
    "rl": Figure("rl", "recipes/quickstart_rl.yaml", RL_METRICS, tiny=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("figure", choices=sorted(FIGURES))
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (at least 3 for a spread)")
    p.add_argument("--threads", default="1", help="comma list of thread counts; each seed runs at each")
    p.add_argument("-o", "--out", default="runs/seeds", help="output folder")
    p.add_argument("--table", action="store_true", help="only print the table of the runs OUT already holds")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def ftkit(args: list[str], threads: int, log: Path) -> None:
    """One `ftkit` command in its own process (as a user runs it), its output appended to `log`."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "ftkit", *args]
    started = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(command[2:])}\n")
        f.flush()
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        f.write(f"# exit {done.returncode}, {time.perf_counter() - started:.0f} s\n")
    if done.returncode != 0:
        raise SystemExit(f"`ftkit {' '.join(args)}` failed (exit {done.returncode}); see {log}")


def metrics_of(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())["metrics"] if path.is_file() else {}


def run_one(fig: Figure, seed: int, threads: int, out: Path) -> dict[str, dict[str, float]]:
    """Train (or RL) one seed at one thread count and evaluate it; {"before": metrics, "after": metrics}."""
    run = out / f"{fig.name}-t{threads}-s{seed}"
    log = out / f"{run.name}.log"
    overrides = [f"train.output_dir={run}", f"train.seed={seed}", f"train.cpu_threads={threads}"]
    if fig.tiny:
        overrides.append(f"model.tiny.init_seed={seed}")
    if fig.name == "rl":
        sft = out / f"quickstart-t{threads}-s{seed}"
        if not (sft / "summary.json").is_file():
            raise SystemExit(
                f"{sft}: no quickstart run for seed {seed} at {threads} thread(s); "
                f"run `python bench/seeds.py quickstart --seeds {seed} --threads {threads}` first"
            )
        data_eval = "eval_data-" + Path(RL_DATA).stem.replace(".", "_") + ".json"
        if not (run / "summary.json").is_file():
            ftkit(["rl", fig.recipe, f"model.base={sft}", *overrides, "--resume"], threads, log)
        for target in (sft, run):
            if not (target / data_eval).is_file():
                ftkit(["eval", str(target), "--data", RL_DATA], threads, log)
        return {"before": metrics_of(sft / data_eval), "after": metrics_of(run / data_eval)}
    if not (run / "summary.json").is_file():
        ftkit(["train", fig.recipe, *overrides, "--resume"], threads, log)
    if not (run / "eval.json").is_file():
        ftkit(["eval", str(run)], threads, log)
    if not (run / "eval_base.json").is_file():
        ftkit(["eval", str(run), "--base"], threads, log)
    return {"before": metrics_of(run / "eval_base.json"), "after": metrics_of(run / "eval.json")}


def collect(fig: Figure, out: Path) -> dict[int, dict[int, dict[str, dict[str, float]]]]:
    """What OUT holds for a figure: {threads: {seed: {"before"/"after": metrics}}}, finished runs only."""
    found: dict[int, dict[int, dict]] = {}
    for run in sorted(out.glob(f"{fig.name}-t*-s*")):
        if not run.is_dir():
            continue
        threads, seed = (int(part[1:]) for part in run.name[len(fig.name) + 1 :].split("-"))
        if fig.name == "rl":
            data_eval = "eval_data-" + Path(RL_DATA).stem.replace(".", "_") + ".json"
            before, after = out / f"quickstart-t{threads}-s{seed}" / data_eval, run / data_eval
        else:
            before, after = run / "eval_base.json", run / "eval.json"
        if before.is_file() and after.is_file():
            summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
            found.setdefault(threads, {})[seed] = {
                "before": metrics_of(before),
                "after": metrics_of(after),
                "train_seconds": summary.get("train_seconds"),
            }
    return found


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation [min, max], in percent."""
    pct = [100 * v for v in values]
    sd = f"{statistics.stdev(pct):.1f}" if len(pct) > 1 else "n/a (one seed)"
    return f"{statistics.fmean(pct):.1f} ± {sd} [{min(pct):.1f}, {max(pct):.1f}]"


def table(fig: Figure, found) -> list[dict]:
    rows = []
    for threads, seeds in sorted(found.items()):
        for metric in fig.metrics:
            pairs = [(s, r["before"].get(metric), r["after"].get(metric)) for s, r in sorted(seeds.items())]
            pairs = [(s, b, a) for s, b, a in pairs if b is not None and a is not None]
            if not pairs:
                continue
            before, after = [b for _, b, _ in pairs], [a for _, _, a in pairs]
            gain = [a - b for _, b, a in pairs]
            rows.append(
                {
                    "figure": fig.name,
                    "threads": threads,
                    "metric": metric,
                    "seeds": [s for s, _, _ in pairs],
                    "before": spread(before),
                    "after": spread(after),
                    "gain": spread(gain),
                    "after_values": [round(100 * a, 1) for a in after],
                }
            )
    return rows


def print_table(fig: Figure, rows: list[dict], found) -> None:
    label = "before = the quickstart model" if fig.name == "rl" else "before = the untrained base (--base)"
    print(f"\n{fig.name}: % over seeds, mean ± sample std [min, max]; {label}")
    head = ("threads", "metric", "n", "before", "after", "after - before", "after, per seed")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print(
            "| "
            + " | ".join(
                str(x)
                for x in (
                    r["threads"],
                    r["metric"],
                    len(r["seeds"]),
                    r["before"],
                    r["after"],
                    r["gain"],
                    ", ".join(map(str, r["after_values"])),
                )
            )
            + " |"
        )
    for threads, seeds in sorted(found.items()):
        secs = [s["train_seconds"] for s in seeds.values() if s.get("train_seconds")]
        if secs:
            print(f"train seconds at {threads} thread(s): " + ", ".join(f"{x:.0f}" for x in secs))


def main(argv=None) -> None:
    args = parse_args(argv)
    fig = FIGURES[args.figure]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if fig.name == "chat" and not (ROOT / "data" / "arithmetic.jsonl").is_file():
            subprocess.run([sys.executable, "data/make_arithmetic.py"], cwd=ROOT, check=True)
        for threads in _ints(args.threads):
            for seed in _ints(args.seeds):
                started = time.perf_counter()
                run_one(fig, seed, threads, out)
                print(
                    f"{fig.name} seed {seed} at {threads} thread(s): done in {time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    found = collect(fig, out)
    rows = table(fig, found)
    print_table(fig, rows, found)
    (out / "seeds.json").write_text(json.dumps({**_read(out / "seeds.json"), fig.name: rows}, indent=1) + "\n")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    main()
