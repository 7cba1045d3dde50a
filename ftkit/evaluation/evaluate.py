"""`ftkit eval RUN`: evaluate a run directory as an `EvalRequest` asks and write the result into it.

The run's model is loaded (final weights, a checkpoint, or the base), the examples chosen (a split of the recipe's,
or a --data file), each sampling mode evaluated with `evaluate_examples`, and the result written to the file
`result_name` gives it (`eval.json` only for the recipe's own evaluation; see `ftkit.evaluation.result_files`).

Compute in the comparison. A verifier-guided row may spend up to (1 + rounds) x steps decoder forwards per example,
so `--compare-verifier` reports decoder forwards per example for each row and adds an equal-forwards baseline:
plain sampling best-of-n, n = the verifier row's forwards / the plain row's (rounded), the sample the task's checker
flags least kept per example. Both use the same checker and about the same decoder forwards; one re-noises the
flagged positions, the other draws whole new samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.evaluation.core import Progress, best_of_n, evaluate_examples, sample_seed
from ftkit.evaluation.report import EvalReport
from ftkit.evaluation.request import DATA_FILE_LIMIT, EvalRequest, check_answer_budget
from ftkit.evaluation.result_files import (
    BEST_OF_N,
    PLAIN,
    VERIFIER,
    measured_weights,
    result_name,
    split_size,
    write_json_atomic,
)
from ftkit.recipe import EvalSection
from ftkit.run.lock import holds_run_lock
from ftkit.tasks.base import Example
from ftkit.tasks.data import load_examples
from ftkit.tasks.sandbox import SandboxPolicy


def evaluate_run(request: EvalRequest, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate a run as `request` asks and write the result into it; return the same dict, whose "file" names the
    file written. The recipe's own evaluation writes `eval.json`; anything else a file named by what differs
    (`result_name`). A --compare-verifier request stores every mode under `modes`. `progress(label, done, total)`
    hears each mode's batches."""
    return _evaluate_locked(request.run_dir, request, progress)


def _load_run(run_dir: Path, adapter: bool, checkpoint: str | None = None):
    # Late import: rundir pulls in the model loaders; tests replace this function with in-memory pieces.
    from ftkit.run.rundir import load_run

    return load_run(run_dir, trained=adapter, checkpoint=checkpoint)


@dataclass
class _Modes:
    """Evaluates the chosen examples of a loaded run in one sampling mode at a time, all with the same settings."""

    run: Any
    examples: list[Example]
    cfg: EvalSection
    sandbox: SandboxPolicy  # and records the isolation model code ran in
    progress: Progress | None

    def evaluate(self, with_verifier: bool, n_steps: int, seed: int | None = None, label: str | None = None):
        with self.sandbox:
            return evaluate_examples(
                self.run.model,
                self.run.tokenizer,
                self.run.task,
                self.examples,
                dataclasses.replace(self.cfg, steps=n_steps, seed=self.cfg.seed if seed is None else seed),
                self.run.canvas_length,
                self.run.recipe.train.max_prompt_length,
                with_verifier,
                progress=self.progress,
                label=label or (VERIFIER if with_verifier else PLAIN),
            )


@holds_run_lock("eval")
def _evaluate_locked(run_dir: Path, request: EvalRequest, progress: Progress | None) -> dict[str, Any]:
    from ftkit.run.rundir import require_directory, say
    from ftkit.run.threads import apply_threads

    run_dir = require_directory(run_dir)
    request.check()
    run = _load_run(run_dir, adapter=not request.base_only, checkpoint=request.checkpoint)
    recipe = run.recipe
    check_answer_budget(run.task, request.max_new_tokens)
    threads = apply_threads(recipe.train.cpu_threads)
    cfg = request.settings(recipe.eval)
    examples, size = _choose_examples(request, run, cfg, run_dir)
    weights = measured_weights(run_dir, recipe, request.base_only, getattr(run, "weights_dir", None))
    notes = _notes(request, recipe, cfg, examples, weights.get("checkpoint"))
    for note in notes:
        say(f"note: {note}")
    stem, differences = result_name(
        recipe,
        cfg,
        size,
        base=request.base_only,
        checkpoint=weights.get("checkpoint"),
        data_path=request.data_path,
        full=recipe.is_full,
    )

    modes = _Modes(run, examples, cfg, SandboxPolicy(allow_weak=cfg.allow_weak_sandbox), progress)
    primary = VERIFIER if cfg.verifier_renoise else PLAIN
    reports = _evaluate_modes(modes, request.compare_verifier, notes)
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "file": f"{stem}.json",
        "canonical": stem == "eval",
        "differs_from_recipe": differences,
        "task": recipe.task.name,
        "split": cfg.split,
        "adapter": not request.base_only,
        "full_model": recipe.is_full,  # the run trained every weight: "adapter" means its trained model
        "checkpoint": weights.get("checkpoint"),
        "weights": weights,  # exactly what was measured: base, final or checkpoint, with the weights' sha256
        "data_path": request.data_path,
        "base": recipe.model.base,
        "canvas_length": run.canvas_length,
        "num_examples": len(examples),
        "num_examples_requested": size if size is not None else len(examples),
        "eval": dataclasses.asdict(cfg),
        "primary": primary,
        "metrics": reports[primary].metrics,
        "modes": {k: v.to_dict() for k, v in reports.items()},
        "notes": notes,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_threads": threads.threads,
    }
    if weights["source"] == "final":
        # The final trained weights evaluated (the adapter's, or a full run's model), under the key push checks.
        report["adapter_sha256"] = weights["sha256"]
    if request.sweep_steps:
        _sweep(modes, reports[primary], request, primary, run_dir, stem, report)
    if modes.sandbox.record():
        report["sandbox"] = modes.sandbox.record()
    write_json_atomic(run_dir / f"{stem}.json", report)
    return report


def _choose_examples(request: EvalRequest, run, cfg: EvalSection, run_dir: Path) -> tuple[list[Example], int | None]:
    """(the examples to evaluate, the size the result's name says: None for every example of a --data file)."""
    recipe = run.recipe
    if request.data_path is not None:
        size = request.num_examples or DATA_FILE_LIMIT
        examples = load_examples(
            run.task, "all", size, recipe.task.seed, request.data_path, say_fewer=request.num_examples is not None
        )
        if not examples:
            raise FtkitError(f"--data {request.data_path}: no examples in it")
        return examples, request.num_examples  # the name says a size only when one was asked for
    size = min(cfg.num_examples, split_size(recipe, cfg.split))
    if size <= 0:
        raise FtkitError(f"{run_dir}: the recipe's {cfg.split} split is empty (task.{cfg.split}_size)")
    return load_examples(run.task, cfg.split, size, recipe.task.seed, recipe.task.data_path), size


def _notes(
    request: EvalRequest, recipe, cfg: EvalSection, examples: list[Example], checkpoint_name: str | None
) -> list[str]:
    """What the user should know about what was evaluated: a checkpoint standing in for missing final weights, a
    split smaller than -n."""
    notes = []
    if request.checkpoint is None and checkpoint_name is not None:
        # Training has not finished: what exists is a checkpoint, whose result must never pass for the final one.
        notes.append(
            f"the run has no final {'model' if recipe.is_full else 'adapter'} yet (training has not "
            f"finished): this evaluated its newest checkpoint, {checkpoint_name}"
        )
    asked = request.num_examples
    if request.data_path is None and asked is not None and len(examples) < asked:
        notes.append(
            f"-n {asked}: the {cfg.split} split has {len(examples)} examples (task.{cfg.split}_size); "
            "evaluated all of them"
        )
    return notes


def _evaluate_modes(modes: _Modes, compare_verifier: bool, notes: list[str]) -> dict[str, EvalReport]:
    """The recipe's sampling mode; with `compare_verifier` plain and verifier-guided sampling, plus plain best-of-n
    at the verifier row's decoder forwards (a note says when n = 1 leaves no such row)."""
    cfg = modes.cfg
    primary = VERIFIER if cfg.verifier_renoise else PLAIN
    reports = {primary: modes.evaluate(cfg.verifier_renoise, cfg.steps)}
    if not compare_verifier:
        return reports
    other = PLAIN if cfg.verifier_renoise else VERIFIER
    reports[other] = modes.evaluate(not cfg.verifier_renoise, cfg.steps)
    reports = {k: reports[k] for k in (PLAIN, VERIFIER)}
    n = max(1, round(reports[VERIFIER].mean_steps_used / max(reports[PLAIN].mean_steps_used, 1e-9)))
    if n > 1:
        samples = [reports[PLAIN]] + [
            modes.evaluate(False, cfg.steps, sample_seed(cfg.seed, k), label=f"{BEST_OF_N} ({k + 1}/{n})")
            for k in range(1, n)
        ]
        reports[BEST_OF_N] = best_of_n(modes.run.task, modes.examples, samples)
    else:
        notes.append("no best-of-n row: the verifier row spent about the plain row's decoder forwards (n = 1)")
    return reports


def _sweep(
    modes: _Modes,
    primary_report: EvalReport,
    request: EvalRequest,
    primary: str,
    run_dir: Path,
    stem: str,
    report: dict[str, Any],
) -> None:
    """--sweep-steps: the primary mode at each step count (the evaluated one reused), written to
    `<stem>_sweep.json` and plotted to `<stem>_sweep.png`; the points and file names go into `report`."""
    from ftkit.run.plots import plot_metrics_vs_steps

    cfg = modes.cfg
    points = []
    for n_steps in sorted(set(request.sweep_steps)):
        rep = (
            primary_report
            if n_steps == cfg.steps
            else modes.evaluate(cfg.verifier_renoise, n_steps, label=f"sweep {n_steps} steps")
        )
        points.append(
            {
                "steps": n_steps,
                "metrics": rep.metrics,
                "mean_steps_used": rep.mean_steps_used,
                "tokens_per_forward": rep.tokens_per_forward,
                "seconds": rep.seconds,
            }
        )
    sweep = {
        "run_dir": str(run_dir),
        "mode": primary,
        "adapter": not request.base_only,
        "split": cfg.split,
        "num_examples": len(modes.examples),
        "points": points,
    }
    write_json_atomic(run_dir / f"{stem}_sweep.json", sweep)
    what = "adapter" if not request.base_only else "base"
    plot_metrics_vs_steps(
        points, run_dir / f"{stem}_sweep.png", title=f"{modes.run.recipe.task.name} ({cfg.split}, {what}, {primary})"
    )
    report["sweep"] = points
    report["sweep_files"] = [f"{stem}_sweep.json", f"{stem}_sweep.png"]
