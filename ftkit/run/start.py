"""Where a training command (`ftkit train`, `ftkit rl`) starts in its run directory, and the run files both write
the same way: one implementation, so the two commands cannot drift apart on what a run directory promises
(docs/runs.md).

`plan_start` takes the run's lock and decides from what the directory holds: a fresh start (clearing what an attempt
that saved nothing left), a resume from the newest intact checkpoint (moving damaged ones aside), or nothing to do
(the run is complete). The rest are the run files a training command writes: the logs trimmed back to the resumed
step, the final adapter or full model (staged, each file atomic), the parameter table.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.run import rundir
from ftkit.run.lock import RunLock
from ftkit.run.paths import RunPaths

# What a resumed run must share with the run it continues: the adapter continues on the same base.
SAME_ON_RESUME = ("model", "lora", "quant")


@dataclass(frozen=True)
class Start:
    """Where a training call starts, as decided by the main process."""

    checkpoint: str | None = None  # the checkpoint to resume from
    step: int = 0  # its global step
    done: bool = False  # the checkpoint is at max_steps: nothing to train, only the final files to write
    complete_summary: dict[str, Any] | None = None  # the run had finished: its summary, nothing to do at all


def plan_start(
    lock: RunLock,
    run_dir: Path,
    recipe,
    resume: bool,
    same_sections: tuple[str, ...] = SAME_ON_RESUME,
    attempt_files: tuple[str, ...] = (),
) -> Start:
    """Take the lock, then decide from what the run directory holds: a fresh start (clearing what an attempt that
    saved nothing left: train's files plus `attempt_files`), a resume from the newest intact checkpoint, or nothing
    to do. Nothing is replaced that a user might want to keep (checkpoints, the final adapter, summary,
    evaluations), and a directory ftkit did not make is not written into. A resume must keep the recipe sections
    named in `same_sections`."""
    foreign = rundir.foreign_entries(run_dir)
    if foreign:
        raise FtkitError(
            f"{run_dir}: exists and is not an ftkit run directory (it holds {', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); choose another train.output_dir (a new or empty one)"
        )
    lock.acquire()
    ckpt = rundir.newest_intact_checkpoint(run_dir) if resume else None
    if ckpt is None:
        kept = rundir.kept_results(run_dir)
        if kept and not resume:
            raise FtkitError(
                f"{run_dir}: already holds a run ({', '.join(kept[:3])}); pass --resume to continue it "
                "or choose another train.output_dir"
            )
        if kept:
            raise FtkitError(
                f"{run_dir}: --resume: no intact checkpoint to continue from, and the run holds results "
                f"a new run would replace ({', '.join(kept[:3])}); choose another train.output_dir"
            )
        if rundir.clear_attempt(run_dir, also=attempt_files):
            rundir.say(f"{run_dir}: an earlier attempt saved no checkpoint; starting over")
        elif resume:
            rundir.say(f"{run_dir}: --resume: no checkpoint yet; starting from scratch")
        return Start()

    _check_resume_settings(run_dir, recipe, same_sections)
    rundir.check_run_inputs(run_dir, recipe)
    step, max_steps = rundir.checkpoint_step(ckpt), recipe.train.max_steps
    if step > max_steps:
        raise FtkitError(
            f"{ckpt}: step {step} is past train.max_steps={max_steps}; raise train.max_steps to continue the run"
        )
    if step == max_steps:
        summary = RunPaths(run_dir).summary
        if summary.is_file() and rundir.final_weights_problem(run_dir, recipe.is_full) is None:
            rundir.say(f"{run_dir}: the run is complete (step {step} of {max_steps}); nothing to resume")
            return Start(str(ckpt), step, done=True, complete_summary=json.loads(summary.read_text()))
        final = "model" if recipe.is_full else "adapter"
        rundir.say(f"resuming from {ckpt.name}: training is done; writing the final {final}")
        return Start(str(ckpt), step, done=True)
    rundir.say(f"resuming from {ckpt.name} (step {step} of {max_steps})")
    return Start(str(ckpt), step)


def _check_resume_settings(run_dir: Path, recipe, same_sections: tuple[str, ...]) -> None:
    """A resume keeps the recipe sections `same_sections` and train.trainable of the run it continues."""
    if not RunPaths(run_dir).recipe.exists():
        return
    previous = rundir.load_run_recipe(run_dir)
    changed = [key for s in same_sections for key in changed_keys(s, getattr(previous, s), getattr(recipe, s))]
    if previous.train.trainable != recipe.train.trainable:  # an adapter cannot continue a full model, or back
        changed.append(f"train.trainable ({previous.train.trainable} -> {recipe.train.trainable})")
    if changed:
        raise FtkitError(
            f"{run_dir}: --resume with other settings than the run was started with: "
            f"{', '.join(changed)}; these must stay as they were (the checkpoint continues them)"
        )


def changed_keys(prefix: str, old: Any, new: Any) -> list[str]:
    """`prefix.key (old -> new)` for every leaf that differs between two recipe sections (dataclasses or dicts)."""
    import dataclasses

    old, new = (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in (old, new))
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            key for k in dict.fromkeys([*old, *new]) for key in changed_keys(f"{prefix}.{k}", old.get(k), new.get(k))
        ]
    return [] if old == new else [f"{prefix} ({old!r} -> {new!r})"]


def stderr_note(text: str) -> None:
    """A dim line on stderr (the thread choice, ...), beside the progress display."""
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, style="dim")


def print_parameter_groups(groups) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="parameters by group", title_justify="left")
    for col in ("group", "trainable", "total"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for g in groups:
        table.add_row(g.name, f"{g.trainable:,}", f"{g.total:,}")
    table.add_row("all", f"{sum(g.trainable for g in groups):,}", f"{sum(g.total for g in groups):,}", style="bold")
    Console(stderr=True).print(table)


def reset_logs(run_dir: Path, resumed_step: int) -> None:
    """A fresh run starts with empty logs; a resumed one keeps what was logged up to its checkpoint. A log row's
    step counts finished optimizer steps; a noise row's step is the one being computed (one less)."""
    for name, keep in (
        (RunPaths.TRAIN_LOG, lambda step: step <= resumed_step),
        (RunPaths.NOISE_LOG, lambda step: step < resumed_step),
    ):
        path = run_dir / name
        if resumed_step == 0:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = [r for r in rundir.read_jsonl(path) if keep(r.get("step", 0))]
            rundir.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def copy_weights(ckpt: Path, run_dir: Path, full: bool = False) -> None:
    """The final adapter (or full model) from a checkpoint (the Trainer saved it with the same save_pretrained),
    each file atomic. PEFT's README.md is left out: an empty template card, not the run's (`ftkit push` writes
    one)."""
    for name in RunPaths.saved_model_files(ckpt, full):
        if (ckpt / name).exists():
            rundir.atomic_write(run_dir / name, lambda tmp, src=ckpt / name: shutil.copyfile(src, tmp))


def save_weights(model, run_dir: Path, full: bool = False) -> None:
    """save_pretrained into a staging dir, then move the files into place one by one (each atomic), the weights
    before the config that names them. `full`: the whole model (config, generation config, safetensors with the
    ties recorded, not duplicated), so the run directory loads with `from_pretrained`. PEFT's template README.md
    stays behind, as in `copy_weights`."""
    staging = RunPaths(run_dir).weights_staging
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    for name in RunPaths.saved_model_files(staging, full):
        if (staging / name).exists():
            (staging / name).replace(run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
