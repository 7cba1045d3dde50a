"""`ftkit rl`: recipe -> run directory -> (before eval) -> RLTrainer -> adapter, logs, reward plot, (after eval).

The run directory has `ftkit train`'s layout (recipe.yaml, the PEFT adapter, tokenizer, base/ for tiny,
checkpoints/, train_log.jsonl, versions.json, summary.json, the lock) and its lifecycle (ftkit.run.start), so
`ftkit eval`, `generate` and `push` work on it, plus:

    reference_adapter/   the init_from run's adapter, copied at the start: the KL anchor and the resume point
    rl_eval_before.json  the held-out evaluation of the starting policy (rl.evaluate), written before step 1
    rl_eval.json         before and after side by side (and the sha256 of the adapter "after" is), written when the
                         run completes
    reward.png           the reward curve
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe import Recipe
from ftkit.run import filecheck, rundir
from ftkit.run import start as runstart
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

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference_adapter"
EVAL_BEFORE = "rl_eval_before.json"
RL_EVAL = "rl_eval.json"
REWARD_PLOT = "reward.png"
# What an rl attempt writes before its first checkpoint, besides train's files: cleared when it is started over.
ATTEMPT_FILES = (REFERENCE_DIR, f".staging-{REFERENCE_DIR}", ".staging-base", EVAL_BEFORE, REWARD_PLOT)
# A resumed run keeps the rl section too: its rounds, rewards and reference would differ otherwise.
SAME_ON_RESUME = (*runstart.SAME_ON_RESUME, "rl")


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
    if getattr(train, "trainable", "lora") != "lora":  # the key comes with full-parameter training
        raise RecipeError(
            f"{where}: `train.trainable`={train.trainable}: ftkit rl trains a LoRA adapter only (its reference policy "
            "is the adapter frozen, or the base with the adapter off); set train.trainable=lora"
        )
    if recipe.lora.dropout != 0.0:
        raise RecipeError(
            f"{where}: `lora.dropout` must be 0 for ftkit rl: the importance ratio compares the policy with the one "
            "that sampled under the same corruption draws, and dropout would make them differ by noise"
        )


def init_adapter(recipe: Recipe) -> Path | None:
    """The `rl.init_from` run (None without one), after checking every file RL reads from it (its recipe, final
    adapter, tokenizer and tiny base) and that it fits this recipe: one FtkitError naming what is wrong."""
    if recipe.rl.init_from is None:
        return None
    init_dir = Path(recipe.rl.init_from)
    where = f"rl.init_from={init_dir}"
    if not init_dir.is_dir():
        raise FtkitError(f"{where}: no such run directory (run `ftkit train` first)")
    if _is_full_parameter_run(init_dir):
        raise FtkitError(
            f"{where}: a full-parameter run (train.trainable: full); ftkit rl continues a LoRA adapter "
            f"only. To RL that model, make it the base: model.base={init_dir} with rl.init_from: null "
            "(a fresh adapter on it; recipes/quickstart_rl.yaml does this)"
        )
    try:
        rundir.require_run_dir(init_dir)
        source = rundir.load_run_recipe(init_dir)
        if not (init_dir / rundir.SUMMARY).is_file() and not (init_dir / rundir.ADAPTER_CONFIG).exists():
            raise FtkitError(
                f"{init_dir}: the run has no final adapter (unfinished? `ftkit train RECIPE --resume` finishes it)"
            )
        damage = rundir.final_adapter_problem(init_dir)
        if damage:
            raise FtkitError(
                f"{init_dir}/{damage}; it is the adapter RL would continue: `ftkit train RECIPE --resume` "
                "on that run writes it again from its last checkpoint"
            )
        rundir.check_run_inputs(init_dir, source)
    except FtkitError as e:
        raise FtkitError(f"{where}: {e}") from None
    for section in ("model", "quant", "lora"):
        if getattr(source, section) != getattr(recipe, section):
            raise FtkitError(
                f"{where}: its `{section}` section differs from this recipe's; RL continues that "
                f"run's adapter on the same base, so copy its `{section}` section into the RL recipe"
            )
    return init_dir


def _is_full_parameter_run(run_dir: Path) -> bool:
    """A run that trained every weight (`train.trainable: full`) and saved a whole model, not an adapter. Read off
    the raw recipe and the files, so the answer does not depend on this ftkit knowing the key."""
    from ftkit.recipe import read_yaml

    try:
        data = read_yaml(run_dir / rundir.RECIPE_FILE)
    except FtkitError:
        data = None
    train = data.get("train") if isinstance(data, dict) else None
    if isinstance(train, dict) and train.get("trainable") == "full":
        return True
    return not (run_dir / rundir.ADAPTER_CONFIG).exists() and (run_dir / "model.safetensors").exists()


def check_reference(run_dir: Path) -> None:
    """A resumed run's copy of the init adapter (its starting point and KL reference) is there and whole."""
    for name in rundir.ADAPTER_FILES:
        path = run_dir / REFERENCE_DIR / name
        what = filecheck.problem(path)
        if what:
            raise FtkitError(
                f"{path}: {what}; it is the copy of rl.init_from's adapter this run started from (the KL "
                f"reference): copy {name} back from the init_from run, or start a new run"
            )


def one_canvas_layouts(task, tokenizer, examples, canvas_length: int, max_prompt_length: int):
    """(examples, layouts) of the training split, laid out as `ftkit eval` lays them out (the same token rules), each
    answer in one canvas: an RL sample is one canvas, so a task whose reference answers span more (a multi-block
    chat task) is refused, naming how many. An example that does not fit otherwise (a prompt over
    max_prompt_length) is an error, or skipped and counted for a task whose `skip_bad_rows` is true (as in
    training)."""
    from ftkit.tasks.data import lay_out_examples, warn_skipped

    kept, layouts, skipped = lay_out_examples(task, tokenizer, examples, canvas_length, max_prompt_length)
    long_answers = [(ex.id, lay.content_length) for ex, lay in zip(kept, layouts) if lay.num_blocks > 1]
    if long_answers:
        first, tokens = long_answers[0]
        raise FtkitError(
            f"task {task.name}: {len(long_answers)} of {len(examples)} training answers are longer than one canvas "
            f"(first: example {first}, {tokens} tokens with its end-of-turn token; canvas_length={canvas_length}); "
            "ftkit rl samples and scores one canvas per answer and does not support multi-block answers: use data "
            "whose answers fit one canvas"
        )
    warn_skipped(log, skipped, len(examples), who="rl: ", what="training example(s)")
    if not kept:
        raise FtkitError(f"task {task.name}: no training example fits the model (see the warning above)")
    return kept, layouts


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
    from ftkit.evaluation.core import evaluate_examples

    report = evaluate_examples(
        model,
        tokenizer,
        task,
        examples,
        recipe.eval,
        canvas_length,
        recipe.train.max_prompt_length,
        recipe.eval.verifier_renoise,
    )
    return report.to_dict()


def _policy(recipe: Recipe, tokenizer, run_dir: Path, canvas_length: int, from_adapter: bool):
    """The base (as `ftkit train` loads it: 4-bit, checkpointing) with the trainable adapter — the copied init adapter
    or a fresh LoRA — and the reference policy."""
    from transformers import set_seed

    from ftkit.model import arch
    from ftkit.model.load import load_base
    from ftkit.model.lora import attach_lora
    from ftkit.rl.likelihood import ReferencePolicy

    model = load_base(recipe.model, recipe.quant, tokenizer, run_dir)
    if arch.canvas_length(model) != canvas_length:
        raise FtkitError(f"model canvas_length {arch.canvas_length(model)} != {canvas_length}")
    if recipe.train.gradient_checkpointing:
        from ftkit.model.checkpointing import set_gradient_checkpointing

        set_gradient_checkpointing(model, True, encoder=recipe.train.checkpoint_encoder)
        model.enable_input_require_grads()
    set_seed(recipe.train.seed)  # PEFT draws a fresh lora_A from the global RNG
    if from_adapter:
        model = rundir.load_adapter(
            model, run_dir / REFERENCE_DIR, trainable=True, shared_stacks=recipe.lora.shared_stacks
        )
    else:
        model = attach_lora(model, recipe.lora)
    if recipe.quant.mode == "none":  # a quantized base is already on its GPU (and cannot be moved)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model, ReferencePolicy(model, frozen_adapter=from_adapter)


def rl(
    recipe: Recipe, resume: bool = False, progress: bool = True, extra_callbacks: list | None = None
) -> dict[str, Any]:
    """Run (or resume) `ftkit rl`; the run directory behaves as `ftkit train`'s (ftkit.run.start: one writer, resume
    from the newest intact checkpoint, a complete run left as it is, an attempt that saved nothing started over)."""
    from accelerate import PartialState

    from ftkit.sft.run import check_launch

    check_rl_recipe(recipe)
    check_launch(recipe)
    if PartialState(cpu=not torch.cuda.is_available()).num_processes > 1:
        raise FtkitError("ftkit rl runs in one process; launch it without `accelerate launch` / torchrun")
    run_dir = Path(recipe.train.output_dir)
    fresh = not run_dir.exists()
    lock = RunLock(run_dir, "rl")
    try:
        start = plan_start(lock, run_dir, recipe, resume, SAME_ON_RESUME, ATTEMPT_FILES)
        if start.complete_summary is not None:
            return start.complete_summary
        return _rl(recipe, run_dir, start, fresh, progress, extra_callbacks)
    finally:
        lock.release()


def _rl(
    recipe: Recipe, run_dir: Path, start: Start, created: bool, progress: bool, extra_callbacks: list | None
) -> dict[str, Any]:
    from ftkit.model import arch
    from ftkit.model.load import load_tokenizer
    from ftkit.model.lora import parameter_groups
    from ftkit.rl.rollout import Rollout
    from ftkit.rl.trainer import RLTrainer, StepItems, collate_items
    from ftkit.run.plots import plot_reward_curve
    from ftkit.run.threads import apply_threads
    from ftkit.sft.run import training_arguments
    from ftkit.sft.trainer import JsonlLogCallback, LogLineCallback
    from ftkit.tasks import make_task

    threads = apply_threads(recipe.train.cpu_threads)  # before any work: the load average must not count ours
    stderr_note(threads.describe())
    from_adapter = recipe.rl.init_from is not None
    try:
        task = make_task(recipe.task.name, recipe.task.options)
        # A fresh start copies the init_from run's adapter; a resumed run has its copy (init_from may be gone).
        init_dir = init_adapter(recipe) if start.checkpoint is None else None
        if start.checkpoint is not None and from_adapter:
            check_reference(run_dir)
        tokenizer = load_tokenizer(recipe.model, run_dir if start.checkpoint else init_dir)
        canvas_length = recipe.model.tiny.canvas_length if recipe.is_random_init else None
        if canvas_length is None:
            from transformers import AutoConfig

            canvas_length = arch.canvas_length(
                AutoConfig.from_pretrained(recipe.model.base, revision=recipe.model.revision)
            )
        examples = task.build_dataset("train", recipe.task.train_size, recipe.task.seed, recipe.task.data_path)
        if not examples:
            raise FtkitError(
                f"{recipe.task.data_path or f'the {recipe.task.name} builder'}: the train dataset is empty"
            )
        examples, layouts = one_canvas_layouts(task, tokenizer, examples, canvas_length, recipe.train.max_prompt_length)
        held_out = []
        if recipe.rl.evaluate:
            size = min(recipe.eval.num_examples, recipe.task.test_size)
            held_out = task.build_dataset("test", size, recipe.task.seed, recipe.task.data_path) if size > 0 else []
            if not held_out:
                raise FtkitError("rl.evaluate: the test split is empty (task.test_size); set rl.evaluate=false to skip")

        # versions.json first: it marks the directory as a run (rundir.foreign_entries)
        rundir.atomic_write_json(run_dir / rundir.VERSIONS, rundir.library_versions())
        rundir.atomic_write_text(run_dir / rundir.RECIPE_FILE, recipe.to_yaml())
        tokenizer.save_pretrained(run_dir)
        if init_dir is not None:
            _copy_reference(init_dir, run_dir)
        model, reference = _policy(recipe, tokenizer, run_dir, canvas_length, from_adapter)
        print_parameter_groups(parameter_groups(model))

        reset_logs(run_dir, start.step)
        if recipe.rl.evaluate and filecheck.problem(run_dir / EVAL_BEFORE) is not None:
            # The starting policy (the checkpoint is loaded later, by the Trainer): the same on every attempt.
            rundir.atomic_write_json(
                run_dir / EVAL_BEFORE, _evaluate(model, tokenizer, task, held_out, recipe, canvas_length)
            )

        callbacks = [JsonlLogCallback(run_dir / rundir.TRAIN_LOG), *(extra_callbacks or [])]
        if progress:
            from trl.trainer.callbacks import RichProgressCallback

            callbacks.append(RichProgressCallback())
        else:
            callbacks.append(LogLineCallback())
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
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # bare dicts; the callbacks above print each log
    except BaseException:
        if created and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-made is left behind
        raise
    began, cpu_began = time.time(), time.process_time()
    if start.done:
        # The checkpoint at max_steps holds the final adapter: load it, train nothing (the Trainer would run one
        # step past it).
        model.load_adapter(start.checkpoint, "default", is_trainable=True)
    else:
        trainer.train(resume_from_checkpoint=start.checkpoint)
    elapsed, cpu_seconds = time.time() - began, time.process_time() - cpu_began

    if start.done:
        copy_adapter(Path(start.checkpoint), run_dir)
    else:
        save_adapter(model, run_dir)
    rows = rundir.read_jsonl(run_dir / rundir.TRAIN_LOG)
    plot_reward_curve(rows, run_dir / REWARD_PLOT)
    comparison = None
    if recipe.rl.evaluate:
        after = _evaluate(model, tokenizer, task, held_out, recipe, canvas_length)
        before = json.loads((run_dir / EVAL_BEFORE).read_text())
        comparison = _comparison(recipe, before, after, run_dir)
        rundir.atomic_write_json(run_dir / RL_EVAL, comparison)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = _summary(recipe, rows, trainer.totals, elapsed, cpu_seconds, start.step, comparison, trainable)
    rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    return summary


def _comparison(recipe: Recipe, before: dict[str, Any], after: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from ftkit.evaluation.result_files import file_sha256

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
        "sampling": {
            stage: {k: report[k] for k in ("mean_steps_used", "forward_passes", "seconds")}
            for stage, report in (("before", before), ("after", after))
        },
        # What "after" evaluated: `ftkit push` cites these numbers only for the adapter the run still holds.
        "adapter_sha256": file_sha256(run_dir / rundir.ADAPTER_WEIGHTS),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _summary(
    recipe: Recipe,
    rows,
    totals: dict[str, Any],
    elapsed: float,
    cpu_seconds: float,
    resumed_step: int,
    comparison: dict[str, Any] | None,
    trainable: int,
) -> dict[str, Any]:
    from ftkit.run.threads import machine_description

    logged = [r for r in rows if "reward" in r]
    first, last = (logged[0], logged[-1]) if logged else ({}, {})
    return {
        "stage": "rl",  # what `ftkit push` tells an RL run by (its card describes the RL stage)
        "base_model": recipe.model.base,
        "task": recipe.task.name,
        "init_from": recipe.rl.init_from,
        "steps": recipe.train.max_steps,
        "resumed_from_step": resumed_step,
        "reward_start": first.get("reward"),
        "reward_end": last.get("reward"),
        "success_start": first.get("success"),
        "success_end": last.get("success"),
        # The last logged KL: a logging window whose groups all had equal rewards kept no sample and has none.
        "kl_end": next((r["kl"] for r in reversed(logged) if r.get("kl") is not None), None),
        "train_seconds": round(elapsed, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),  # this process's CPU time (the machine may be shared)
        "trainable_parameters": trainable,
        # This invocation only (a resumed run counts from its checkpoint on).
        "cost": {k: round(v, 2) if isinstance(v, float) else v for k, v in totals.items()},
        "before": comparison["before"] if comparison else None,
        "after": comparison["after"] if comparison else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "machine": machine_description(),
    }
