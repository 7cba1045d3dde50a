"""What `ftkit train` (ftkit.sft.run) and `ftkit rl` (ftkit.rl.run) do alike around their training, in one place so
the two commands cannot drift apart: check the launch, take the run's lock and decide where to start, note the thread
choice, read the canvas length, write the run files, prepare the base model, map the recipe to TrainingArguments, log,
leave nothing half-made behind, and write the final weights."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ftkit.errors import FtkitError
from ftkit.model import arch
from ftkit.recipe import Recipe, make_training_arguments
from ftkit.run import rundir
from ftkit.run.lock import RunLock
from ftkit.run.paths import RunPaths
from ftkit.run.start import SAME_ON_RESUME, Start, copy_weights, plan_start, save_weights, stderr_note


def run_locked(
    recipe: Recipe,
    command: str,
    resume: bool,
    body: Callable[[Path, Start, bool], dict[str, Any]],
    *,
    processes: int = 1,
    decide: Callable[[Callable[[], Start]], Start] = lambda plan: plan(),
    same_sections: tuple[str, ...] = SAME_ON_RESUME,
    attempt_files: tuple[str, ...] = (),
    on_complete: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Hold the run directory's lock while `body(run_dir, start, fresh)` trains; `fresh`: the directory did not exist
    before this call. Where to start is `plan_start`'s verdict, reached through `decide` (under several processes,
    the main process decides for all); a run already complete returns its summary after `on_complete()`."""
    run_dir = Path(recipe.train.output_dir)
    fresh = not run_dir.exists()
    lock = RunLock(run_dir, command, processes=processes)
    try:
        start = decide(lambda: plan_start(lock, run_dir, recipe, resume, same_sections, attempt_files))
        if start.complete_summary is not None:
            on_complete()
            return start.complete_summary
        return body(run_dir, start, fresh)
    finally:
        lock.release()


def training_arguments(recipe: Recipe, run_dir: Path):
    """The recipe's train section (and `training_args`) as transformers.TrainingArguments, checkpoints under
    RUN/checkpoints: for both trainers (`ftkit rl` passes a recipe with one placeholder item per step). The mapping
    itself is the recipe's (ftkit.recipe.training_args); this adds what only the launch knows."""
    cuda = torch.cuda.is_available()
    # A preset holds fp32 weights whatever model.dtype says, as does full training (make_fully_trainable): on a GPU
    # they compute in bf16 under autocast when the recipe asks for it.
    bf16 = cuda and recipe.model.dtype == "bfloat16" and (recipe.is_full or not recipe.is_random_init)
    distributed = PartialState().num_processes > 1
    try:
        return make_training_arguments(
            recipe, str(RunPaths(run_dir).checkpoints), cuda=cuda, bf16=bf16, distributed=distributed
        )
    except (TypeError, ValueError) as e:  # a value TrainingArguments itself rejects (the recipe checked the types)
        raise FtkitError(f"training_args: transformers.TrainingArguments rejects the recipe's settings: {e}") from None


def check_launch(recipe: Recipe) -> None:
    """Settings the launcher rules out, refused before anything loads. FSDP unshards parameters in hooks around
    each wrapped module's forward; the lean loss path (`diffusion.loss_chunk > 0`) calls the encoder, decoder and
    head below the root module, whose parameters (embeddings, head) would stay sharded. DDP is fine either way."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP") and recipe.diffusion.loss_chunk > 0:
        raise FtkitError(
            f"diffusion.loss_chunk={recipe.diffusion.loss_chunk}: FSDP needs the unchunked loss path; "
            "override with diffusion.loss_chunk=0 (see docs/multi-gpu.md)"
        )


def apply_thread_choice(recipe: Recipe, show: bool = True) -> None:
    """Choose the CPU threads before any work (the load average must not count ours), and say what was chosen."""
    from ftkit.run.threads import apply_threads

    threads = apply_threads(recipe.train.cpu_threads)
    if show:
        stderr_note(threads.describe())


def canvas_length(recipe: Recipe) -> int:
    """The canvas length the run trains with: a preset's own, or the base model's config (read without loading the
    weights). A full-parameter run checks there that the base can be trained whole."""
    if recipe.is_random_init:
        return recipe.model.tiny.canvas_length
    from transformers import AutoConfig

    from ftkit.model.load import check_full_training

    config = AutoConfig.from_pretrained(recipe.model.base, revision=recipe.model.revision)
    if recipe.is_full:
        check_full_training(config, recipe.model.base)
    return arch.canvas_length(config)


def write_run_files(paths: RunPaths, recipe: Recipe, tokenizer) -> None:
    """versions.json first (it marks the directory as a run: rundir.foreign_entries), the recipe, the tokenizer."""
    paths.root.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write_json(paths.versions, rundir.library_versions())
    rundir.atomic_write_text(paths.recipe, recipe.to_yaml())
    tokenizer.save_pretrained(paths.root)


def prepare_base(model, recipe: Recipe, canvas: int) -> None:
    """The loaded base before its trainable weights are made: the canvas it was built with, gradient
    checkpointing, and the seed PEFT draws a fresh lora_A from (two runs of one recipe start from one adapter)."""
    from transformers import set_seed

    if arch.canvas_length(model) != canvas:
        raise FtkitError(f"model canvas_length {arch.canvas_length(model)} != {canvas}")
    if recipe.train.gradient_checkpointing:
        from ftkit.model.checkpointing import set_gradient_checkpointing

        set_gradient_checkpointing(model, True, encoder=recipe.train.checkpoint_encoder)
        model.enable_input_require_grads()
    set_seed(recipe.train.seed)


def log_callbacks(paths: RunPaths, progress: bool, extra: list | None) -> list:
    """train_log.jsonl, the caller's callbacks, then a rich progress display or (`progress=False`) one plain line
    per log."""
    from ftkit.run.log_callbacks import JsonlLogCallback, LogLineCallback

    callbacks = [JsonlLogCallback(paths.train_log), *(extra or [])]
    if progress:
        from trl.trainer.callbacks import RichProgressCallback

        callbacks.append(RichProgressCallback())
    else:
        callbacks.append(LogLineCallback())
    return callbacks


def quiet_printer(trainer) -> None:
    """The Trainer's own printer writes bare dicts; the callbacks of `log_callbacks` print each log."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)


@contextmanager
def removed_on_failure(run_dir: Path, created: bool) -> Iterator[None]:
    """Anything failing before training starts removes a run directory this call created: nothing half-made is
    left behind."""
    try:
        yield
    except BaseException:
        if created and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def write_final_weights(model, start: Start, run_dir: Path, full: bool = False) -> None:
    """The run's final adapter (or full model): copied from the checkpoint at max_steps when training was already
    done, else saved from the trained model."""
    if start.done:
        copy_weights(Path(start.checkpoint), run_dir, full=full)
    else:
        save_weights(model, run_dir, full=full)
