"""`ftkit rl`: recipe -> run directory -> (before eval) -> RLTrainer -> adapter, logs, reward plot, (after eval).

The run directory has `ftkit train`'s layout (recipe.yaml, the PEFT adapter, tokenizer, base/ for tiny,
checkpoints/, train_log.jsonl, versions.json, summary.json), so `ftkit eval`, `generate` and `push` work on it, plus:

    reference_adapter/   the init_from run's adapter, copied at the start: the KL anchor and the resume point
    rl_eval_before.json  the held-out evaluation of the starting policy (rl.evaluate), written before step 1
    rl_eval.json         before and after side by side, written when the run completes
    reward.png           the reward curve
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ftkit import rundir
from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe import Recipe

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference_adapter"
EVAL_BEFORE = "rl_eval_before.json"
RL_EVAL = "rl_eval.json"
REWARD_PLOT = "reward.png"


def check_rl_recipe(recipe: Recipe, where: str = "<recipe>") -> None:
    """What `ftkit rl` needs of the other sections; raised before anything loads."""
    rl, train = recipe.rl, recipe.train
    if train.save_steps % rl.num_iterations:
        raise RecipeError(
            f"{where}: `train.save_steps`={train.save_steps} must be a multiple of `rl.num_iterations`="
            f"{rl.num_iterations}: a checkpoint inside a round could not re-sample that round on resume"
        )
    if train.grad_accum != 1:
        raise RecipeError(
            f"{where}: `train.grad_accum` must be 1 for ftkit rl: one optimizer step already covers the whole round, "
            "in micro-batches of `train.batch_size` canvases"
        )
    if recipe.lora.dropout != 0.0:
        raise RecipeError(
            f"{where}: `lora.dropout` must be 0 for ftkit rl: the importance ratio compares the policy with the one "
            "that sampled under the same corruption draws, and dropout would make them differ by noise"
        )


def init_adapter(recipe: Recipe) -> Path | None:
    """The adapter of the `rl.init_from` run (None without one), after checking that it fits this recipe."""
    if recipe.rl.init_from is None:
        return None
    init_dir = Path(recipe.rl.init_from)
    if not init_dir.is_dir():
        raise FtkitError(f"rl.init_from={init_dir}: no such run directory (run `ftkit train` first)")
    init_dir = rundir.require_run_dir(init_dir)
    if not (init_dir / rundir.ADAPTER_CONFIG).is_file():
        raise FtkitError(f"rl.init_from={init_dir}: the run has no final adapter (unfinished? resume it first)")
    from ftkit.recipe import load_recipe

    source = load_recipe(init_dir / rundir.RECIPE_FILE)
    for section in ("model", "quant", "lora"):
        if getattr(source, section) != getattr(recipe, section):
            raise FtkitError(
                f"rl.init_from={init_dir}: its `{section}` section differs from this recipe's; RL continues that "
                f"run's adapter on the same base, so copy its `{section}` section into the RL recipe"
            )
    return init_dir


def _copy_reference(init_dir: Path, run_dir: Path) -> None:
    """The tiny base the init adapter was made on (if any), then the adapter into run_dir/reference_adapter; each
    staged and renamed into place, so a present reference_adapter/ means both are complete."""
    if (init_dir / "base").is_dir() and not (run_dir / "base").exists():
        staging = run_dir / ".staging-base"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(init_dir / "base", staging)
        rundir.replace_dir(staging, run_dir / "base")
    staging = run_dir / f".staging-{REFERENCE_DIR}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (rundir.ADAPTER_CONFIG, rundir.ADAPTER_WEIGHTS):
        shutil.copy2(init_dir / name, staging / name)
    rundir.replace_dir(staging, run_dir / REFERENCE_DIR)


def _evaluate(model, tokenizer, task, examples, recipe: Recipe, canvas_length: int) -> dict[str, Any]:
    from ftkit.evaluate import evaluate_examples

    report = evaluate_examples(model, tokenizer, task, examples, recipe.eval, canvas_length,
                               recipe.train.max_prompt_length, recipe.eval.verifier_renoise)
    return report.to_dict()


def _run_dir_state(recipe: Recipe, resume: bool) -> tuple[Path, bool, Path | None]:
    """(run dir, whether this call creates it, its last checkpoint), refusing to overwrite a run or to resume one
    with other model/lora/quant/rl sections (its samples and reference would differ)."""
    run_dir = Path(recipe.train.output_dir)
    fresh = not run_dir.exists()
    last_ckpt = rundir.latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume and last_ckpt is None:
        log.warning("--resume: no checkpoint in %s; starting from scratch", run_dir)
    if not resume and (run_dir / rundir.RECIPE_FILE).exists():
        raise FtkitError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another train.output_dir")
    if resume and (run_dir / rundir.RECIPE_FILE).exists():
        from ftkit.recipe import load_recipe

        previous = load_recipe(run_dir / rundir.RECIPE_FILE)
        changed = [s for s in ("model", "lora", "quant", "rl") if getattr(previous, s) != getattr(recipe, s)]
        if changed:
            raise FtkitError(f"{run_dir}: --resume with a different {'/'.join(changed)} section than the run was started with")
    return run_dir, fresh, last_ckpt


def _policy(recipe: Recipe, tokenizer, run_dir: Path, canvas_length: int, from_adapter: bool):
    """The base (as `ftkit train` loads it: 4-bit, checkpointing) with the trainable adapter — the copied init adapter
    or a fresh LoRA — and the reference policy."""
    from transformers import set_seed

    from ftkit.model import attach_lora, load_base
    from ftkit.rl.likelihood import ReferencePolicy

    model = load_base(recipe.model, recipe.quant, tokenizer, run_dir)
    if int(model.config.canvas_length) != canvas_length:
        raise FtkitError(f"model canvas_length {model.config.canvas_length} != {canvas_length}")
    if recipe.train.gradient_checkpointing:
        from ftkit.checkpointing import set_gradient_checkpointing

        set_gradient_checkpointing(model, True, encoder=recipe.train.checkpoint_encoder)
        model.enable_input_require_grads()
    set_seed(recipe.train.seed)  # PEFT draws a fresh lora_A from the global RNG
    if from_adapter:
        model = rundir.load_adapter(model, run_dir / REFERENCE_DIR, trainable=True)
    else:
        model = attach_lora(model, recipe.lora)
    if recipe.quant.mode != "4bit":  # a 4-bit base is already on its GPU (and cannot be moved)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model, ReferencePolicy(model, frozen_adapter=from_adapter)


def rl(recipe: Recipe, resume: bool = False, progress: bool = True, extra_callbacks: list | None = None) -> dict[str, Any]:
    from accelerate import PartialState

    from ftkit.layout import layout_example
    from ftkit.model import load_tokenizer, parameter_groups
    from ftkit.plots import plot_reward_curve
    from ftkit.rl.rollout import Rollout
    from ftkit.rl.trainer import RLTrainer, StepItems, collate_items
    from ftkit.tasks import make_task
    from ftkit.train import _print_parameter_groups, _reset_logs, _save_adapter, check_launch, training_arguments

    check_rl_recipe(recipe)
    check_launch(recipe)
    if PartialState(cpu=not torch.cuda.is_available()).num_processes > 1:
        raise FtkitError("ftkit rl runs in one process; launch it without `accelerate launch` / torchrun")
    run_dir, fresh, last_ckpt = _run_dir_state(recipe, resume)
    # A run that already copied its reference adapter no longer needs the init_from run (it may be gone by now).
    from_adapter = recipe.rl.init_from is not None
    copied = (run_dir / REFERENCE_DIR / rundir.ADAPTER_CONFIG).is_file()
    init_dir = init_adapter(recipe) if from_adapter and not copied else None
    task = make_task(recipe.task.name, recipe.task.options)
    try:
        tokenizer = load_tokenizer(recipe.model, run_dir if not fresh else init_dir)
        canvas_length = recipe.model.tiny.canvas_length if recipe.is_tiny else None
        if canvas_length is None:
            from transformers import AutoConfig

            canvas_length = int(AutoConfig.from_pretrained(recipe.model.base, revision=recipe.model.revision).canvas_length)
        examples = task.build_dataset("train", recipe.task.train_size, recipe.task.seed, recipe.task.data_path)
        if not examples:
            raise FtkitError(f"{recipe.task.data_path or f'the {recipe.task.name} builder'}: the train dataset is empty")
        layouts = [layout_example(tokenizer, task.to_prompt_canvas(ex), canvas_length, recipe.train.max_prompt_length,
                                  ex.id) for ex in examples]
        held_out = []
        if recipe.rl.evaluate:
            size = min(recipe.eval.num_examples, recipe.task.test_size)
            held_out = task.build_dataset("test", size, recipe.task.seed, recipe.task.data_path) if size > 0 else []
            if not held_out:
                raise FtkitError("rl.evaluate: the test split is empty (task.test_size); set rl.evaluate=false to skip")

        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_text(run_dir / rundir.RECIPE_FILE, recipe.to_yaml())
        rundir.atomic_write_json(run_dir / rundir.VERSIONS, rundir.library_versions())
        tokenizer.save_pretrained(run_dir)
        if init_dir is not None:
            _copy_reference(init_dir, run_dir)
        model, reference = _policy(recipe, tokenizer, run_dir, canvas_length, from_adapter)
        _print_parameter_groups(parameter_groups(model))

        resumed_step = 0
        if resume and last_ckpt is not None:
            resumed_step = int(json.loads((last_ckpt / "trainer_state.json").read_text()).get("global_step", 0))
        _reset_logs(run_dir, resumed_step)
        if recipe.rl.evaluate and not (run_dir / EVAL_BEFORE).is_file():
            rundir.atomic_write_json(run_dir / EVAL_BEFORE,
                                     _evaluate(model, tokenizer, task, held_out, recipe, canvas_length))

        callbacks = [_jsonl_log(run_dir), *(extra_callbacks or [])]
        if progress:
            from trl.trainer.callbacks import RichProgressCallback

            callbacks.append(RichProgressCallback())
        # The Trainer's batch is one placeholder per optimizer step; the round's micro-batches are RLTrainer's.
        one_item = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=1, grad_accum=1))
        trainer = RLTrainer(
            model=model,
            args=training_arguments(one_item, run_dir),
            train_dataset=StepItems(recipe.train.max_steps),
            data_collator=collate_items,
            callbacks=callbacks,
            rollout=Rollout(task, tokenizer, examples, layouts, recipe.rl, recipe.eval, recipe.train.seed),
            rl=recipe.rl,
            reference=reference,
            micro_batch=recipe.train.batch_size,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            diffusion=recipe.diffusion,
        )
    except BaseException:
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-made is left behind
        raise
    start = time.time()
    trainer.train(resume_from_checkpoint=str(last_ckpt) if (resume and last_ckpt) else None)
    elapsed = time.time() - start

    _save_adapter(model, run_dir)
    rows = rundir.read_jsonl(run_dir / rundir.TRAIN_LOG)
    plot_reward_curve(rows, run_dir / REWARD_PLOT)
    comparison = None
    if recipe.rl.evaluate:
        after = _evaluate(model, tokenizer, task, held_out, recipe, canvas_length)
        before = json.loads((run_dir / EVAL_BEFORE).read_text())
        comparison = _comparison(recipe, before, after)
        rundir.atomic_write_json(run_dir / RL_EVAL, comparison)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = _summary(recipe, rows, trainer.totals, elapsed, resumed_step, comparison, trainable)
    rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    return summary


def _jsonl_log(run_dir: Path):
    from ftkit.trainer import JsonlLogCallback

    return JsonlLogCallback(run_dir / rundir.TRAIN_LOG)


def _comparison(recipe: Recipe, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    metrics = [k for k in after["metrics"] if k in before["metrics"] and not k.startswith("count")]
    return {
        "task": recipe.task.name,
        "split": "test",
        "num_examples": after["num_examples"],
        "init_from": recipe.rl.init_from,
        "eval": dataclasses.asdict(recipe.eval),
        "before": before["metrics"],
        "after": after["metrics"],
        "delta": {k: after["metrics"][k] - before["metrics"][k] for k in metrics},
        "sampling": {stage: {k: report[k] for k in ("mean_steps_used", "forward_passes", "seconds")}
                     for stage, report in (("before", before), ("after", after))},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _summary(recipe: Recipe, rows, totals: dict[str, Any], elapsed: float, resumed_step: int,
             comparison: dict[str, Any] | None, trainable: int) -> dict[str, Any]:
    logged = [r for r in rows if "reward" in r]
    first, last = (logged[0], logged[-1]) if logged else ({}, {})
    return {
        "base_model": recipe.model.base,
        "task": recipe.task.name,
        "init_from": recipe.rl.init_from,
        "steps": recipe.train.max_steps,
        "resumed_from_step": resumed_step,
        "reward_start": first.get("reward"),
        "reward_end": last.get("reward"),
        "success_start": first.get("success"),
        "success_end": last.get("success"),
        "kl_end": last.get("kl"),
        "train_seconds": round(elapsed, 2),
        "trainable_parameters": trainable,
        # This invocation only (a resumed run counts from its checkpoint on).
        "cost": {k: round(v, 2) if isinstance(v, float) else v for k, v in totals.items()},
        "before": comparison["before"] if comparison else None,
        "after": comparison["after"] if comparison else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
