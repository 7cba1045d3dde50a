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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe import Recipe
from ftkit.run import filecheck, prepare, rundir
from ftkit.run import start as runstart
from ftkit.run.paths import RL_STAGE, RunPaths
from ftkit.run.start import Start, print_parameter_groups, reset_logs

log = logging.getLogger(__name__)

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
        init = RunPaths(init_dir)
        if not init.summary.is_file() and not (init_dir / RunPaths.ADAPTER_CONFIG).exists():
            raise FtkitError(
                f"{init_dir}: the run has no final adapter (unfinished? `ftkit train RECIPE --resume` finishes it)"
            )
        damage = rundir.final_weights_problem(init_dir)
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
        data = read_yaml(RunPaths(run_dir).recipe)
    except FtkitError:
        data = None
    train = data.get("train") if isinstance(data, dict) else None
    if isinstance(train, dict) and train.get("trainable") == "full":
        return True
    return not (run_dir / RunPaths.ADAPTER_CONFIG).exists() and (run_dir / RunPaths.FULL_WEIGHTS).exists()


def check_reference(run_dir: Path) -> None:
    """A resumed run's copy of the init adapter (its starting point and KL reference) is there and whole."""
    for name in RunPaths.adapter_files():
        path = RunPaths(run_dir).reference / name
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
    init, run = RunPaths(init_dir), RunPaths(run_dir)
    if init.base.is_dir() and not run.base.exists():
        staging = run / RunPaths.staging(RunPaths.BASE)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(init.base, staging)
        rundir.replace_dir(staging, run.base)
    staging = run / RunPaths.staging(RunPaths.REFERENCE)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in RunPaths.adapter_files():
        shutil.copy2(init_dir / name, staging / name)
    rundir.replace_dir(staging, run.reference)


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
    from ftkit.model.load import load_base
    from ftkit.model.lora import attach_lora
    from ftkit.rl.likelihood import ReferencePolicy

    model = load_base(recipe.model, recipe.quant, tokenizer, run_dir)
    prepare.prepare_base(model, recipe, canvas_length)
    if from_adapter:
        model = rundir.load_adapter(
            model, RunPaths(run_dir).reference, trainable=True, shared_stacks=recipe.lora.shared_stacks
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

    check_rl_recipe(recipe)
    prepare.check_launch(recipe)
    if PartialState(cpu=not torch.cuda.is_available()).num_processes > 1:
        raise FtkitError("ftkit rl runs in one process; launch it without `accelerate launch` / torchrun")

    def body(run_dir: Path, start: Start, fresh: bool) -> dict[str, Any]:
        return _rl(recipe, run_dir, start, fresh, progress, extra_callbacks)

    return prepare.run_locked(
        recipe, "rl", resume, body, same_sections=SAME_ON_RESUME, attempt_files=RunPaths.rl_attempt_files()
    )


@dataclass
class _Prepared:
    """What `ftkit rl` trains and evaluates: built before training starts (a failure there removes a run directory
    it made)."""

    model: Any
    trainer: Any
    tokenizer: Any
    task: Any
    held_out: list
    canvas_length: int


def _rl(
    recipe: Recipe, run_dir: Path, start: Start, created: bool, progress: bool, extra_callbacks: list | None
) -> dict[str, Any]:
    prepare.apply_thread_choice(recipe)
    paths = RunPaths(run_dir)
    with prepare.removed_on_failure(run_dir, created):
        prepared = _prepare(recipe, paths, start, progress, extra_callbacks)
    model, trainer = prepared.model, prepared.trainer
    began, cpu_began = time.time(), time.process_time()
    if start.done:
        # The checkpoint at max_steps holds the final adapter: load it, train nothing (the Trainer would run one
        # step past it).
        model.load_adapter(start.checkpoint, "default", is_trainable=True)
    else:
        trainer.train(resume_from_checkpoint=start.checkpoint)
    elapsed, cpu_seconds = time.time() - began, time.process_time() - cpu_began
    return _finish(recipe, paths, start, prepared, elapsed, cpu_seconds)


def _prepare(recipe: Recipe, paths: RunPaths, start: Start, progress: bool, extra_callbacks: list | None) -> _Prepared:
    """Task data, run files (with the reference adapter), policy, the starting policy's evaluation, trainer."""
    from ftkit.model.load import load_tokenizer
    from ftkit.model.lora import parameter_groups
    from ftkit.rl.rollout import Rollout
    from ftkit.tasks import make_task

    run_dir = paths.root
    from_adapter = recipe.rl.init_from is not None
    task = make_task(recipe.task.name, recipe.task.options)
    # A fresh start copies the init_from run's adapter; a resumed run has its copy (init_from may be gone).
    init_dir = init_adapter(recipe) if start.checkpoint is None else None
    if start.checkpoint is not None and from_adapter:
        check_reference(run_dir)
    tokenizer = load_tokenizer(recipe.model, run_dir if start.checkpoint else init_dir)
    canvas = prepare.canvas_length(recipe)
    examples, layouts = _training_examples(recipe, task, tokenizer, canvas)
    held_out = _held_out(recipe, task)

    prepare.write_run_files(paths, recipe, tokenizer)
    if init_dir is not None:
        _copy_reference(init_dir, run_dir)
    model, reference = _policy(recipe, tokenizer, run_dir, canvas, from_adapter)
    print_parameter_groups(parameter_groups(model))

    reset_logs(run_dir, start.step)
    if recipe.rl.evaluate and filecheck.problem(paths.rl_eval_before) is not None:
        # The starting policy (the checkpoint is loaded later, by the Trainer): the same on every attempt.
        rundir.atomic_write_json(paths.rl_eval_before, _evaluate(model, tokenizer, task, held_out, recipe, canvas))
    rollout = Rollout(task, tokenizer, examples, layouts, recipe.rl, recipe.eval, recipe.train.seed)
    trainer = _trainer(
        recipe, paths, model, tokenizer, rollout, reference, prepare.log_callbacks(paths, progress, extra_callbacks)
    )
    return _Prepared(model, trainer, tokenizer, task, held_out, canvas)


def _training_examples(recipe: Recipe, task, tokenizer, canvas: int):
    examples = task.build_dataset("train", recipe.task.train_size, recipe.task.seed, recipe.task.data_path)
    if not examples:
        raise FtkitError(f"{recipe.task.data_path or f'the {recipe.task.name} builder'}: the train dataset is empty")
    return one_canvas_layouts(task, tokenizer, examples, canvas, recipe.train.max_prompt_length)


def _held_out(recipe: Recipe, task) -> list:
    """The test split `rl.evaluate` scores before and after (none without it)."""
    if not recipe.rl.evaluate:
        return []
    size = min(recipe.eval.num_examples, recipe.task.test_size)
    held_out = task.build_dataset("test", size, recipe.task.seed, recipe.task.data_path) if size > 0 else []
    if not held_out:
        raise FtkitError("rl.evaluate: the test split is empty (task.test_size); set rl.evaluate=false to skip")
    return held_out


def _trainer(recipe: Recipe, paths: RunPaths, model, tokenizer, rollout, reference, callbacks: list):
    from ftkit.rl.trainer import RLTrainer, StepItems, collate_items

    # The Trainer's batch is one placeholder per optimizer step; the round's micro-batches are RLTrainer's.
    one_item = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, batch_size=1, grad_accum=1))
    trainer = RLTrainer(
        model=model,
        args=prepare.training_arguments(one_item, paths.root),
        train_dataset=StepItems(recipe.train.max_steps),
        data_collator=collate_items,
        callbacks=callbacks,
        rollout=rollout,
        rl=recipe.rl,
        reference=reference,
        micro_batch=recipe.train.batch_size,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        diffusion=recipe.diffusion,
    )
    prepare.quiet_printer(trainer)
    return trainer


def _finish(
    recipe: Recipe, paths: RunPaths, start: Start, prepared: _Prepared, elapsed: float, cpu_seconds: float
) -> dict[str, Any]:
    """After training: the final adapter, the reward plot, the held-out before/after and summary.json."""
    from ftkit.run.plots import plot_reward_curve

    model = prepared.model
    prepare.write_final_weights(model, start, paths.root)
    rows = rundir.read_jsonl(paths.train_log)
    plot_reward_curve(rows, paths.reward_plot)
    comparison = None
    if recipe.rl.evaluate:
        after = _evaluate(model, prepared.tokenizer, prepared.task, prepared.held_out, recipe, prepared.canvas_length)
        before = json.loads(paths.rl_eval_before.read_text())
        comparison = _comparison(recipe, before, after, paths.root)
        rundir.atomic_write_json(paths.rl_eval, comparison)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = _summary(recipe, rows, prepared.trainer.totals, elapsed, cpu_seconds, start.step, comparison, trainable)
    rundir.atomic_write_json(paths.summary, summary)
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
        "adapter_sha256": file_sha256(run_dir / RunPaths.ADAPTER_WEIGHTS),
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
        "stage": RL_STAGE,  # ftkit.run.paths.is_rl_summary
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
