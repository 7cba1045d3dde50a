"""`ftkit train`: recipe -> data -> base (+4-bit) -> LoRA -> DiffusionTrainer -> weights and run files. The
preparation it shares with `ftkit rl` is ftkit.run.prepare's."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ftkit.diffusion.token_layout import TokenLayout, collate
from ftkit.errors import FtkitError
from ftkit.recipe import Recipe
from ftkit.run import prepare, rundir
from ftkit.run.paths import RunPaths
from ftkit.run.start import Start, print_parameter_groups, reset_logs
from ftkit.run.threads import machine_description

log = logging.getLogger(__name__)


@dataclass
class Collator:
    pad_id: int

    def __call__(self, layouts: list[TokenLayout]) -> dict[str, torch.Tensor]:
        return collate(layouts, self.pad_id)


def train(
    recipe: Recipe, resume: bool = False, progress: bool = True, extra_callbacks: list | None = None
) -> dict[str, Any]:
    prepare.check_launch(recipe)
    # Under `accelerate launch` every process runs this function; the main process holds the run's lock, decides
    # where to start, writes the run files and the tiny base; the others wait for it and read them.
    dist = PartialState(cpu=not torch.cuda.is_available())

    def body(run_dir: Path, start: Start, fresh: bool) -> dict[str, Any]:
        return _train(recipe, dist, run_dir, start, fresh and dist.is_main_process, progress, extra_callbacks)

    return prepare.run_locked(
        recipe,
        "train",
        resume,
        body,
        processes=dist.num_processes,
        decide=lambda plan: _main_decides(dist, plan),
        on_complete=lambda: _teardown(dist),
    )


def _main_decides(dist: PartialState, decide):
    """`decide()` on the main process only; every process gets its result, or raises its FtkitError."""
    if dist.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    crash: BaseException | None = None
    if dist.is_main_process:
        try:
            box[0] = ("ok", decide())
        except FtkitError as e:
            box[0] = ("error", str(e))
        except BaseException as e:  # a bug: the main process shows its traceback, the others stop with it
            box[0], crash = ("error", f"the main process failed: {e.__class__.__name__}: {e}"), e
    broadcast_object_list(box, from_process=0)
    if crash is not None:
        raise crash
    kind, value = box[0]
    if kind == "error":
        raise FtkitError(value)
    return value


def _teardown(dist: PartialState, trainer=None) -> None:
    """The other processes wait for the main one's files, then every process tears the process group down itself:
    a process that exits with gloo's threads still running aborts ("terminate called without an active
    exception", SIGABRT) and torchrun reports the whole run as failed.

    The DDP wrapper goes first, while every rank is still there: its reducer holds the process group, and freed
    after `destroy_process_group` (when `_train` returns) its gloo threads were seen waiting forever for a peer
    that had exited (rank 1 stuck in ~ProcessGroupGloo, the launch never ending)."""
    if dist.num_processes > 1:
        dist.wait_for_everyone()
        if trainer is not None:
            import gc

            trainer.model_wrapped = trainer.model
            trainer.accelerator.free_memory()  # its references to the prepared (wrapped) model and optimizer
            gc.collect()
            dist.wait_for_everyone()
        dist.destroy_process_group()


@dataclass
class _Prepared:
    """What `ftkit train` trains: built before training starts (a failure there removes a run directory it made)."""

    model: Any
    trainer: Any
    groups: list
    canvas_length: int
    train_examples: int


def _train(
    recipe: Recipe,
    dist: PartialState,
    run_dir: Path,
    start: Start,
    created: bool,
    progress: bool,
    extra_callbacks: list | None,
) -> dict[str, Any]:
    from ftkit.tasks import make_task

    prepare.apply_thread_choice(recipe, show=dist.is_main_process)
    task = make_task(recipe.task.name, recipe.task.options)
    paths = RunPaths(run_dir)
    with prepare.removed_on_failure(run_dir, created):
        prepared = _prepare(recipe, dist, paths, start, task, progress, extra_callbacks)
    trainer = prepared.trainer
    began = time.time()
    # A checkpoint at max_steps needs no training (the Trainer would run one step past it and rotate a checkpoint
    # out); its weights are the final ones.
    result = None if start.done else trainer.train(resume_from_checkpoint=start.checkpoint)
    elapsed = time.time() - began

    summary: dict[str, Any] = {}
    try:
        if trainer.is_world_process_zero():
            summary = _finish(recipe, paths, start, prepared, result, elapsed)
    finally:
        _teardown(dist, trainer)
    return summary


def _prepare(
    recipe: Recipe,
    dist: PartialState,
    paths: RunPaths,
    start: Start,
    task,
    progress: bool,
    extra_callbacks: list | None,
) -> _Prepared:
    """Tokenizer, data, run files, model and trainer. Data and tokenizer problems surface before the run directory
    holds anything."""
    from ftkit.model.load import load_base, load_in_turns, load_tokenizer, make_fully_trainable
    from ftkit.model.lora import attach_lora, parameter_groups
    from ftkit.sft.trainer import DiffusionTrainer
    from ftkit.tasks.data import build_training_data

    run_dir = paths.root
    tokenizer = load_tokenizer(recipe.model, run_dir if start.checkpoint else None)
    canvas = prepare.canvas_length(recipe)
    # Built once per fingerprint and cached (ftkit.tasks.data); other processes read what the main one made.
    with dist.main_process_first():
        train_data = build_training_data(task, tokenizer, recipe, canvas)
    if dist.is_main_process:
        prepare.write_run_files(paths, recipe, tokenizer)
    # The main process loads first (a tiny run's base is written then), then the ranks of each node one by one:
    # a 4-bit load holds the dense experts in host RAM until they are quantized.
    model = load_in_turns(lambda: load_base(recipe.model, recipe.quant, tokenizer, run_dir))
    prepare.prepare_base(model, recipe, canvas)
    model = make_fully_trainable(model) if recipe.is_full else attach_lora(model, recipe.lora)
    groups = parameter_groups(model)
    if dist.is_main_process:
        print_parameter_groups(groups)
        reset_logs(run_dir, start.step)
    trainer = DiffusionTrainer(
        model=model,
        args=prepare.training_arguments(recipe, run_dir),
        train_dataset=train_data,
        data_collator=Collator(tokenizer.pad_token_id),
        diffusion=recipe.diffusion,
        noise_log=paths.noise_log,
        callbacks=prepare.log_callbacks(paths, progress, extra_callbacks),
    )
    prepare.quiet_printer(trainer)
    return _Prepared(model, trainer, groups, canvas, len(train_data))


def _finish(recipe: Recipe, paths: RunPaths, start: Start, prepared: _Prepared, result, elapsed: float):
    """On the main process after training: the final weights, summary.json and the plots."""
    from ftkit.run.plots import plot_loss_curve, plot_noise_vs_loss

    prepare.write_final_weights(prepared.model, start, paths.root, full=recipe.is_full)
    summary = _summary(
        recipe,
        paths.root,
        prepared.groups,
        prepared.canvas_length,
        result,
        elapsed,
        start.step,
        prepared.train_examples,
    )
    rundir.atomic_write_json(paths.summary, summary)
    plot_loss_curve(rundir.read_jsonl(paths.train_log), paths.loss_plot)
    plot_noise_vs_loss(rundir.read_jsonl(paths.noise_log), paths.noise_plot)
    return summary


def _summary(recipe, run_dir, groups, canvas_length, result, elapsed, resumed_step, train_examples) -> dict[str, Any]:
    rows = [r for r in rundir.read_jsonl(RunPaths(run_dir).train_log) if "loss" in r]
    steps_run = recipe.train.max_steps - resumed_step
    canvas_tokens = steps_run * recipe.train.batch_size * recipe.train.grad_accum * canvas_length
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {
        "base_model": recipe.model.base,
        "trainable": recipe.train.trainable,
        "task": recipe.task.name,
        "steps": recipe.train.max_steps,
        "train_examples": train_examples,  # what was built (a task may have less data than task.train_size asks)
        "resumed_from_step": resumed_step,
        "loss_start": first.get("loss"),
        "loss_end": last.get("loss"),
        "diffusion_loss_start": first.get("diffusion_loss"),
        "diffusion_loss_end": last.get("diffusion_loss"),
        "encoder_loss_start": first.get("encoder_loss"),
        "encoder_loss_end": last.get("encoder_loss"),
        "train_seconds": round(elapsed, 2),
        "canvas_tokens_per_second": round(canvas_tokens / elapsed, 1) if elapsed > 0 and steps_run > 0 else None,
        "parameters": {g.name: {"trainable": g.trainable, "total": g.total} for g in groups},
        "trainable_parameters": sum(g.trainable for g in groups),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "machine": machine_description(),
        "final_train_loss": None if result is None or not math.isfinite(result.training_loss) else result.training_loss,
    }
