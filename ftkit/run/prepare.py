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
from ftkit.model.compat import checkpointing_arguments
from ftkit.recipe.schema import Recipe
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
    RUN/checkpoints: for both trainers (`ftkit rl` passes a recipe with one placeholder item per step)."""
    from transformers import TrainingArguments

    t = recipe.train
    cuda = torch.cuda.is_available()
    # A preset holds fp32 weights whatever model.dtype says, as does full training (make_fully_trainable): on a GPU
    # they compute in bf16 under autocast when the recipe asks for it.
    bf16 = cuda and recipe.model.dtype == "bfloat16" and (recipe.is_full or not recipe.is_random_init)
    try:
        return _training_arguments(TrainingArguments, recipe, run_dir, t, cuda, bf16)
    except (TypeError, ValueError) as e:  # a value TrainingArguments itself rejects (the recipe checked the types)
        raise FtkitError(f"training_args: transformers.TrainingArguments rejects the recipe's settings: {e}") from None


def _training_arguments(TrainingArguments, recipe: Recipe, run_dir: Path, t, cuda: bool, bf16: bool):
    return TrainingArguments(
        output_dir=str(RunPaths(run_dir).checkpoints),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        use_cpu=not cuda,
        # Decoder layers (transformers' GradientCheckpointingLayer); the encoder's are ftkit.model.checkpointing's, in
        # train(). Non-reentrant: reentrant checkpointing would replay the encoder's cache writes.
        **checkpointing_arguments(
            t.gradient_checkpointing, {"use_reentrant": False} if t.gradient_checkpointing else None
        ),
        remove_unused_columns=False,
        # A safety margin, not a need today: every LoRA tensor is reached each step (an expert's LoRA is a slice of
        # one tensor per layer, so experts no token was routed to still share a gradient tensor), but a LoRA target
        # a step's graph skips would make DDP error at the next step without it. Costs one graph traversal a step.
        ddp_find_unused_parameters=PartialState().num_processes > 1,
        dataloader_num_workers=t.num_workers,
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=True,  # the rich progress bar replaces tqdm
        **recipe.training_args,  # every other TrainingArguments field, validated by the recipe
    )


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
    return int(config.canvas_length)


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

    if int(model.config.canvas_length) != canvas:
        raise FtkitError(f"model canvas_length {model.config.canvas_length} != {canvas}")
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
