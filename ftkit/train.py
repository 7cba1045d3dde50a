"""`ftkit train`: recipe -> data -> base (+4-bit) -> LoRA (or every weight, `train.trainable: full`) ->
DiffusionTrainer -> adapter (or full model) and run files."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch.utils.data import Dataset

from ftkit import rundir
from ftkit.errors import FtkitError
from ftkit.layout import Layout, collate, layout_example
from ftkit.recipe import Recipe

log = logging.getLogger(__name__)


class LayoutDataset(Dataset):
    def __init__(self, layouts: list[Layout]):
        self.layouts = layouts

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, i: int) -> Layout:
        return self.layouts[i]


@dataclass
class Collator:
    pad_id: int

    def __call__(self, layouts: list[Layout]) -> dict[str, torch.Tensor]:
        return collate(layouts, self.pad_id)


def build_layouts(task, tokenizer, recipe: Recipe, split: str, size: int, canvas_length: int) -> list[Layout]:
    examples = task.build_dataset(split, size, recipe.task.seed, recipe.task.data_path)
    if not examples:
        where = recipe.task.data_path or f"the {recipe.task.name} builder"
        raise FtkitError(f"{where}: the {split} dataset is empty")
    return [
        layout_example(tokenizer, task.to_prompt_canvas(ex), canvas_length, recipe.train.max_prompt_length, ex.id)
        for ex in examples
    ]


def training_arguments(recipe: Recipe, run_dir: Path):
    from transformers import TrainingArguments

    t = recipe.train
    cuda = torch.cuda.is_available()
    # A preset holds fp32 weights whatever model.dtype says, as does full training (make_fully_trainable): on a GPU
    # they compute in bf16 under autocast when the recipe asks for it.
    bf16 = cuda and recipe.model.dtype == "bfloat16" and (recipe.is_full or not recipe.is_tiny)
    return TrainingArguments(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
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
        activation_checkpointing=t.gradient_checkpointing,
        # Decoder layers (transformers' GradientCheckpointingLayer); the encoder's are ftkit.checkpointing's, in
        # train(). Non-reentrant: reentrant checkpointing would replay the encoder's cache writes.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        remove_unused_columns=False,
        # A safety margin, not a need today: every LoRA tensor is reached each step (an expert's LoRA is a slice of
        # one tensor per layer, so experts no token was routed to still share a gradient tensor), but a LoRA target
        # a step's graph skips would make DDP error at the next step without it. Costs one graph traversal a step.
        ddp_find_unused_parameters=PartialState().num_processes > 1,
        dataloader_num_workers=t.num_workers,
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=True,  # the rich progress bar replaces tqdm
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


def train(recipe: Recipe, resume: bool = False, progress: bool = True, extra_callbacks: list | None = None) -> dict[str, Any]:
    from transformers import set_seed

    from ftkit.model import attach_lora, check_full_training, load_base, load_tokenizer, make_fully_trainable, parameter_groups
    from ftkit.plots import plot_loss_curve, plot_noise_vs_loss
    from ftkit.tasks import make_task
    from ftkit.trainer import DiffusionTrainer, JsonlLogCallback

    check_launch(recipe)
    # Under `accelerate launch` every process runs this function; the main process writes the run files and the
    # tiny base, the others wait for it and read them.
    dist = PartialState(cpu=not torch.cuda.is_available())
    run_dir = Path(recipe.train.output_dir)
    fresh = not run_dir.exists()
    last_ckpt = rundir.latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume and last_ckpt is None:
        log.warning("--resume: no checkpoint in %s; starting from scratch", run_dir)
    if not resume and (run_dir / rundir.RECIPE_FILE).exists():
        raise FtkitError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another train.output_dir"
        )
    if resume and (run_dir / rundir.RECIPE_FILE).exists():
        from ftkit.recipe import load_recipe

        previous = load_recipe(run_dir / rundir.RECIPE_FILE)
        if (previous.model != recipe.model or previous.lora != recipe.lora or previous.quant != recipe.quant
                or previous.train.trainable != recipe.train.trainable):
            raise FtkitError(f"{run_dir}: --resume with a different model/lora/quant section or train.trainable than "
                             "the run was started with")

    task = make_task(recipe.task.name, recipe.task.options)
    dist.wait_for_everyone()  # every process has checked the run dir before the main one writes to it
    try:
        # Data and tokenizer problems surface before the run directory is created; anything failing later
        # (before training starts) removes a run directory this call created.
        tokenizer = load_tokenizer(recipe.model, run_dir if not fresh else None)
        canvas_length = recipe.model.tiny.canvas_length if recipe.is_tiny else None
        if canvas_length is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(recipe.model.base, revision=recipe.model.revision)
            canvas_length = int(config.canvas_length)
            if recipe.is_full:
                check_full_training(config, recipe.model.base)
        train_layouts = build_layouts(task, tokenizer, recipe, "train", recipe.task.train_size, canvas_length)

        with dist.main_process_first():
            if dist.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
                rundir.atomic_write_text(run_dir / rundir.RECIPE_FILE, recipe.to_yaml())
                rundir.atomic_write_json(run_dir / rundir.VERSIONS, rundir.library_versions())
                tokenizer.save_pretrained(run_dir)
            model = load_base(recipe.model, recipe.quant, tokenizer, run_dir)
        if int(model.config.canvas_length) != canvas_length:
            raise FtkitError(f"model canvas_length {model.config.canvas_length} != {canvas_length}")
        if recipe.train.gradient_checkpointing:
            from ftkit.checkpointing import set_gradient_checkpointing

            set_gradient_checkpointing(model, True, encoder=recipe.train.checkpoint_encoder)
            model.enable_input_require_grads()
        # PEFT draws lora_A from the global RNG: seed it, or two runs of one recipe start from different adapters.
        set_seed(recipe.train.seed)
        model = make_fully_trainable(model) if recipe.is_full else attach_lora(model, recipe.lora)
        groups = parameter_groups(model)
        if dist.is_main_process:
            _print_parameter_groups(groups)

        resumed_step = 0
        if resume and last_ckpt is not None:
            trainer_state = json.loads((last_ckpt / "trainer_state.json").read_text())
            resumed_step = int(trainer_state.get("global_step", 0))
        noise_log = run_dir / rundir.NOISE_LOG
        if dist.is_main_process:
            _reset_logs(run_dir, resumed_step)

        callbacks = [JsonlLogCallback(run_dir / rundir.TRAIN_LOG), *(extra_callbacks or [])]
        if progress:
            from trl.trainer.callbacks import RichProgressCallback

            callbacks.append(RichProgressCallback())
        trainer = DiffusionTrainer(
            model=model,
            args=training_arguments(recipe, run_dir),
            train_dataset=LayoutDataset(train_layouts),
            data_collator=Collator(tokenizer.pad_token_id),
            diffusion=recipe.diffusion,
            noise_log=noise_log,
            callbacks=callbacks,
        )
    except BaseException:
        if fresh and run_dir.exists() and dist.is_main_process:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-made is left behind
        raise
    start = time.time()
    result = trainer.train(resume_from_checkpoint=str(last_ckpt) if (resume and last_ckpt) else None)
    elapsed = time.time() - start

    summary: dict[str, Any] = {}
    try:
        if trainer.is_world_process_zero():
            (_save_full_model if recipe.is_full else _save_adapter)(model, run_dir)
            summary = _summary(recipe, run_dir, groups, canvas_length, result, elapsed, resumed_step)
            rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
            plot_loss_curve(rundir.read_jsonl(run_dir / rundir.TRAIN_LOG), run_dir / "loss.png")
            plot_noise_vs_loss(rundir.read_jsonl(noise_log), run_dir / "noise_loss.png")
    finally:
        # The other processes wait for the main one's files, then every process tears the process group down
        # itself: a process that exits with gloo's threads still running aborts ("terminate called without an
        # active exception", SIGABRT) and torchrun reports the whole run as failed.
        if dist.num_processes > 1:
            dist.wait_for_everyone()
            dist.destroy_process_group()
    return summary


def _print_parameter_groups(groups) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="parameters by group", title_justify="left")
    for col in ("group", "trainable", "total"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for g in groups:
        table.add_row(g.name, f"{g.trainable:,}", f"{g.total:,}")
    table.add_row("all", f"{sum(g.trainable for g in groups):,}", f"{sum(g.total for g in groups):,}", style="bold")
    Console(stderr=True).print(table)


def _reset_logs(run_dir: Path, resumed_step: int) -> None:
    """A fresh run starts with empty logs; a resumed one keeps what was logged up to its checkpoint. A log row's
    step counts finished optimizer steps; a noise row's step is the one being computed (one less)."""
    for name, keep in ((rundir.TRAIN_LOG, lambda step: step <= resumed_step),
                       (rundir.NOISE_LOG, lambda step: step < resumed_step)):
        path = run_dir / name
        if resumed_step == 0:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = [r for r in rundir.read_jsonl(path) if keep(r.get("step", 0))]
            rundir.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _save_adapter(model, run_dir: Path) -> None:
    """save_pretrained into a staging dir, then move the two adapter files into place one by one (each atomic)."""
    staging = run_dir / ".staging-adapter"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    for name in (rundir.ADAPTER_WEIGHTS, rundir.ADAPTER_CONFIG, "README.md"):
        if (staging / name).exists():
            (staging / name).replace(run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def _save_full_model(model, run_dir: Path) -> None:
    """save_pretrained (config, generation config, safetensors with the ties recorded, not duplicated) into a staging
    dir, then each file into the run dir (each move atomic); the run dir then loads with `from_pretrained`."""
    staging = run_dir / ".staging-model"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    for path in sorted(staging.iterdir()):
        path.replace(run_dir / path.name)
    shutil.rmtree(staging, ignore_errors=True)


def _summary(recipe, run_dir, groups, canvas_length, result, elapsed, resumed_step) -> dict[str, Any]:
    rows = [r for r in rundir.read_jsonl(run_dir / rundir.TRAIN_LOG) if "loss" in r]
    steps_run = recipe.train.max_steps - resumed_step
    canvas_tokens = steps_run * recipe.train.batch_size * recipe.train.grad_accum * canvas_length
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {
        "base_model": recipe.model.base,
        "trainable": recipe.train.trainable,
        "task": recipe.task.name,
        "steps": recipe.train.max_steps,
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
        "final_train_loss": None if result is None or not math.isfinite(result.training_loss) else result.training_loss,
    }
