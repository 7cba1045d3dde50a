"""`ftkit train`: recipe -> data -> base (+4-bit) -> LoRA -> DiffusionTrainer -> adapter and run files."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ftkit.diffusion.token_layout import TokenLayout, collate
from ftkit.errors import FtkitError
from ftkit.recipe import Recipe, make_training_arguments
from ftkit.run import rundir
from ftkit.run.lock import RunLock
from ftkit.run.start import (
    Start,
    copy_adapter,
    plan_start,
    print_parameter_groups,
    reset_logs,
    save_adapter,
    stderr_note,
)
from ftkit.run.threads import machine_description

log = logging.getLogger(__name__)


@dataclass
class Collator:
    pad_id: int

    def __call__(self, layouts: list[TokenLayout]) -> dict[str, torch.Tensor]:
        return collate(layouts, self.pad_id)


def training_arguments(recipe: Recipe, run_dir: Path):
    cuda = torch.cuda.is_available()
    # A preset holds fp32 weights whatever model.dtype says, as does full training (make_fully_trainable): on a GPU
    # they compute in bf16 under autocast when the recipe asks for it.
    bf16 = cuda and recipe.model.dtype == "bfloat16" and (recipe.is_full or not recipe.is_random_init)
    distributed = PartialState().num_processes > 1
    try:
        return make_training_arguments(
            recipe, str(run_dir / rundir.CHECKPOINTS), cuda=cuda, bf16=bf16, distributed=distributed
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


def train(
    recipe: Recipe, resume: bool = False, progress: bool = True, extra_callbacks: list | None = None
) -> dict[str, Any]:
    check_launch(recipe)
    # Under `accelerate launch` every process runs this function; the main process holds the run's lock, decides
    # where to start, writes the run files and the tiny base; the others wait for it and read them.
    dist = PartialState(cpu=not torch.cuda.is_available())
    run_dir = Path(recipe.train.output_dir)
    fresh = not run_dir.exists()
    lock = RunLock(run_dir, "train", processes=dist.num_processes)
    try:
        start = _main_decides(dist, lambda: plan_start(lock, run_dir, recipe, resume))
        if start.complete_summary is not None:
            _teardown(dist)
            return start.complete_summary
        return _train(recipe, dist, run_dir, start, fresh and dist.is_main_process, progress, extra_callbacks)
    finally:
        lock.release()


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


def _train(
    recipe: Recipe,
    dist: PartialState,
    run_dir: Path,
    start: Start,
    created: bool,
    progress: bool,
    extra_callbacks: list | None,
) -> dict[str, Any]:
    from transformers import set_seed

    from ftkit.model import arch
    from ftkit.model.load import check_full_training, load_base, load_in_turns, load_tokenizer, make_fully_trainable
    from ftkit.model.lora import attach_lora, parameter_groups
    from ftkit.run.plots import plot_loss_curve, plot_noise_vs_loss
    from ftkit.run.threads import apply_threads
    from ftkit.sft.trainer import DiffusionTrainer, JsonlLogCallback, LogLineCallback
    from ftkit.tasks import make_task
    from ftkit.tasks.data import build_training_data

    threads = apply_threads(recipe.train.cpu_threads)  # before any work: the load average must not count ours
    if dist.is_main_process:
        stderr_note(threads.describe())
    task = make_task(recipe.task.name, recipe.task.options)
    try:
        # Data and tokenizer problems surface before the run directory holds anything; anything failing later
        # (before training starts) removes a run directory this call created.
        tokenizer = load_tokenizer(recipe.model, run_dir if start.checkpoint else None)
        canvas_length = recipe.model.tiny.canvas_length if recipe.is_random_init else None
        if canvas_length is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(recipe.model.base, revision=recipe.model.revision)
            canvas_length = arch.canvas_length(config)
            if recipe.is_full:
                check_full_training(config, recipe.model.base)
        # Built once per fingerprint and cached (ftkit.tasks.data); other processes read what the main one made.
        with dist.main_process_first():
            train_data = build_training_data(task, tokenizer, recipe, canvas_length)

        if dist.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            # versions.json first: it marks the directory as a run (rundir.foreign_entries)
            rundir.atomic_write_json(run_dir / rundir.VERSIONS, rundir.library_versions())
            rundir.atomic_write_text(run_dir / rundir.RECIPE_FILE, recipe.to_yaml())
            tokenizer.save_pretrained(run_dir)
        # The main process loads first (a tiny run's base is written then), then the ranks of each node one by one:
        # a 4-bit load holds the dense experts in host RAM until they are quantized.
        model = load_in_turns(lambda: load_base(recipe.model, recipe.quant, tokenizer, run_dir))
        if arch.canvas_length(model) != canvas_length:
            raise FtkitError(f"model canvas_length {arch.canvas_length(model)} != {canvas_length}")
        if recipe.train.gradient_checkpointing:
            from ftkit.model.checkpointing import set_gradient_checkpointing

            set_gradient_checkpointing(model, True, encoder=recipe.train.checkpoint_encoder)
            model.enable_input_require_grads()
        # PEFT draws lora_A from the global RNG: seed it, or two runs of one recipe start from different adapters.
        set_seed(recipe.train.seed)
        model = make_fully_trainable(model) if recipe.is_full else attach_lora(model, recipe.lora)
        groups = parameter_groups(model)
        if dist.is_main_process:
            print_parameter_groups(groups)

        noise_log = run_dir / rundir.NOISE_LOG
        if dist.is_main_process:
            reset_logs(run_dir, start.step)

        callbacks = [JsonlLogCallback(run_dir / rundir.TRAIN_LOG), *(extra_callbacks or [])]
        if progress:
            from trl.trainer.callbacks import RichProgressCallback

            callbacks.append(RichProgressCallback())
        else:
            callbacks.append(LogLineCallback())
        trainer = DiffusionTrainer(
            model=model,
            args=training_arguments(recipe, run_dir),
            train_dataset=train_data,
            data_collator=Collator(tokenizer.pad_token_id),
            diffusion=recipe.diffusion,
            noise_log=noise_log,
            callbacks=callbacks,
        )
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # bare dicts; the callbacks above print each log
    except BaseException:
        if created and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-made is left behind
        raise
    began = time.time()
    # A checkpoint at max_steps needs no training (the Trainer would run one step past it and rotate a checkpoint
    # out); its adapter is the final one.
    result = None if start.done else trainer.train(resume_from_checkpoint=start.checkpoint)
    elapsed = time.time() - began

    summary: dict[str, Any] = {}
    try:
        if trainer.is_world_process_zero():
            if start.done:
                copy_adapter(Path(start.checkpoint), run_dir, full=recipe.is_full)
            else:
                save_adapter(model, run_dir, full=recipe.is_full)
            summary = _summary(recipe, run_dir, groups, canvas_length, result, elapsed, start.step, len(train_data))
            rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
            plot_loss_curve(rundir.read_jsonl(run_dir / rundir.TRAIN_LOG), run_dir / "loss.png")
            plot_noise_vs_loss(rundir.read_jsonl(noise_log), run_dir / "noise_loss.png")
    finally:
        _teardown(dist, trainer)
    return summary


def _summary(recipe, run_dir, groups, canvas_length, result, elapsed, resumed_step, train_examples) -> dict[str, Any]:
    rows = [r for r in rundir.read_jsonl(run_dir / rundir.TRAIN_LOG) if "loss" in r]
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
