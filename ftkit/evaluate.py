"""Evaluation: lay examples out, denoise them in batches, decode, check and score with the task.

`evaluate_examples` works on in-memory pieces (model, tokenizer, task); `evaluate_run` loads a run directory,
evaluates its test (or train) split and writes `eval.json` (`eval_base.json` for the base model without adapter),
optionally a steps sweep (`eval_sweep.json` + `eval_sweep.png`) and a plain-vs-verifier comparison.

Every example gets its own random generator seeded by (eval.seed, its index), so a result does not depend on the
batch size and two modes compared on the same seed share their first denoising pass exactly.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ftkit.diffusion.sample import DenoiseResult, denoise, row_generators, schedule_kwargs
from ftkit.errors import FtkitError
from ftkit.layout import Layout, canvas_to_text, layout_example
from ftkit.recipe import EvalSection
from ftkit.runlock import holds_run_lock
from ftkit.sandbox import SandboxPolicy
from ftkit.tasks.base import Example, Violation

MAX_RENOISE_ROUNDS = 2  # verifier rounds per batch; each round may spend the full `steps` budget again
PLAIN, VERIFIER = "plain", "verifier"


@dataclass
class EvalReport:
    metrics: dict[str, float]
    outputs: list[str]
    records: list[dict[str, Any]]  # per example: id, output, violated constraints, steps used
    steps: int
    verifier_renoise: bool
    mean_steps_used: float
    tokens_per_forward: float
    forward_passes: int
    renoised_cells: int
    seconds: float
    examples_per_second: float
    num_examples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Scoring (no model involved: testable against ground truth)


def score_outputs(task, examples: list[Example], outputs: list[str]) -> tuple[dict[str, float], list[list[Violation]]]:
    """The task's aggregate metrics and each output's violations."""
    violations = [task.check(ex, out) for ex, out in zip(examples, outputs)]
    return task.metrics(examples, outputs), violations


def _token_char_starts(tokenizer, row: list[int], eos_id: int | None) -> tuple[list[int], int, int]:
    """(first character offset of each token before the first EOS, that EOS's index, decoded text length).

    Built from the *output* tokens, decoded one by one as `layout` does for the reference: with a subword tokenizer
    a wrong answer may tokenize differently from the reference, so the reference's char_starts would misplace it."""
    end = row.index(eos_id) if eos_id is not None and eos_id in row else len(row)
    starts, pos = [], 0
    for tid in row[:end]:
        starts.append(pos)
        pos += len(tokenizer.decode([tid], skip_special_tokens=True))
    return starts, end, pos


def char_positions_to_tokens(positions, starts: list[int], end: int, text_length: int, canvas_length: int) -> list[int]:
    """Canvas token indices holding the given character offsets. Offsets past the decoded text (a checker padding a
    short output) map to the positions from the first EOS on, one per character."""
    tokens = set()
    for c in positions:
        if c >= text_length:
            t = end + (c - text_length)
        else:
            t = bisect.bisect_right(starts, c) - 1
        if 0 <= t < canvas_length:
            tokens.add(t)
    return sorted(tokens)


def make_verifier(tokenizer, task, examples: list[Example]) -> Callable[[torch.Tensor], list[list[int]]]:
    """A `denoise` verifier: decode each canvas, run task.check, map the violations' characters to tokens."""

    def verify(canvas: torch.Tensor) -> list[list[int]]:
        out = []
        for ex, row in zip(examples, canvas.tolist()):
            text = canvas_to_text(tokenizer, row)
            chars = {p for v in task.check(ex, text) for p in v.positions}
            starts, end, length = _token_char_starts(tokenizer, row, tokenizer.eos_token_id)
            out.append(char_positions_to_tokens(chars, starts, end, length, len(row)))
        return out

    return verify


# ----------------------------------------------------------------------------------------------------------------
# Batching and sampling


def _batch_tensors(layouts: list[Layout], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded prompts; the canvas carries only the fixed positions' tokens (pad elsewhere), so nothing of the
    answer reaches the sampler."""
    width = max(len(lay.prompt_ids) for lay in layouts)
    prompt_ids = torch.full((len(layouts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(layouts), width), dtype=torch.long)
    for i, lay in enumerate(layouts):
        prompt_ids[i, : len(lay.prompt_ids)] = torch.tensor(lay.prompt_ids)
        prompt_mask[i, : len(lay.prompt_ids)] = 1
    fixed = torch.tensor([lay.fixed for lay in layouts], dtype=torch.bool)
    canvas = torch.tensor([lay.canvas_ids for lay in layouts], dtype=torch.long)
    canvas_init = torch.where(fixed, canvas, torch.full_like(canvas, pad_id))
    return {
        "prompt_ids": prompt_ids.to(device),
        "prompt_mask": prompt_mask.to(device),
        "canvas_init": canvas_init.to(device),
        "fixed_mask": fixed.to(device),
    }


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def evaluate_examples(
    model,
    tokenizer,
    task,
    examples: list[Example],
    eval_cfg: EvalSection,
    canvas_length: int,
    max_prompt_length: int,
    verifier_renoise: bool,
    *,
    max_renoise_rounds: int = MAX_RENOISE_ROUNDS,
    sampler: Callable[..., DenoiseResult] = denoise,
) -> EvalReport:
    """Denoise every example (batches of eval_cfg.batch_size), decode and score. `sampler` is `denoise` unless a
    test swaps it."""
    if not examples:
        raise FtkitError("evaluation: no examples to evaluate")
    model.eval()
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layouts = [
        layout_example(tokenizer, task.to_prompt_canvas(ex), canvas_length, max_prompt_length, ex.id) for ex in examples
    ]

    outputs: list[str] = []
    steps_used: list[int] = []
    tpf_weighted, passes, renoised = 0.0, 0, 0
    started = time.perf_counter()
    for start in range(0, len(examples), eval_cfg.batch_size):
        batch_examples = examples[start : start + eval_cfg.batch_size]
        tensors = _batch_tensors(layouts[start : start + eval_cfg.batch_size], pad_id, device)
        result = sampler(
            model,
            tensors["prompt_ids"],
            tensors["prompt_mask"],
            tensors["canvas_init"],
            tensors["fixed_mask"],
            steps=eval_cfg.steps,
            **schedule_kwargs(eval_cfg),
            generator=row_generators(eval_cfg.seed, len(batch_examples), device, offset=start),
            clamp=eval_cfg.clamp,
            verifier=make_verifier(tokenizer, task, batch_examples) if verifier_renoise else None,
            max_renoise_rounds=max_renoise_rounds,
        )
        outputs.extend(canvas_to_text(tokenizer, row) for row in result.canvas.tolist())
        steps_used.extend(int(s) for s in result.steps_used.tolist())
        tpf_weighted += result.tokens_per_forward * len(batch_examples)
        passes += result.forward_passes
        renoised += result.renoised_cells

    metrics, violations = score_outputs(task, examples, outputs)
    seconds = time.perf_counter() - started
    records = [
        {"id": ex.id, "output": out, "violations": sorted({v.constraint for v in vs}), "steps_used": used}
        for ex, out, vs, used in zip(examples, outputs, violations, steps_used)
    ]
    n = len(examples)
    return EvalReport(
        metrics=metrics,
        outputs=outputs,
        records=records,
        steps=eval_cfg.steps,
        verifier_renoise=verifier_renoise,
        mean_steps_used=sum(steps_used) / n,
        tokens_per_forward=tpf_weighted / n,
        forward_passes=passes,
        renoised_cells=renoised,
        seconds=seconds,
        examples_per_second=n / seconds if seconds > 0 else float("inf"),
        num_examples=n,
    )


# ----------------------------------------------------------------------------------------------------------------
# Run directories


def write_json_atomic(path: Path, data: Any) -> Path:
    """Readers never see half a report (see `ftkit.rundir.atomic_write_json`)."""
    from ftkit.rundir import atomic_write_json

    return atomic_write_json(path, data)


def _load_run(run_dir: Path, adapter: bool, checkpoint: str | None = None):
    # Late import: rundir pulls in the model loaders; tests replace this function with in-memory pieces.
    from ftkit.rundir import load_run

    return load_run(run_dir, adapter=adapter, checkpoint=checkpoint)


def _split_size(recipe, split: str) -> int:
    if split == "test":
        return recipe.task.test_size
    if split == "train":
        return recipe.task.train_size
    raise FtkitError(f"evaluation split {split!r}: expected 'test' or 'train'")


@holds_run_lock("eval")
def evaluate_run(
    run_dir: Path,
    split: str | None = None,
    steps: int | None = None,
    num_examples: int | None = None,
    base_only: bool = False,
    verifier_renoise: bool | None = None,
    sweep_steps: list[int] | None = None,
    compare_verifier: bool = False,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run and write `eval.json` (or `eval_base.json`, or `eval_checkpoint-N.json` for a `checkpoint`:
    a name under checkpoints/, a path, or `latest`) into it; return the same dict.

    With `sweep_steps`, the primary mode is also evaluated at each step count (`eval_sweep.json`, `eval_sweep.png`,
    `_base` in the names for the base model). With `compare_verifier`, plain and verifier-guided sampling are both
    evaluated on the same examples and seeds, and both stored under `modes`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FtkitError(f"{run_dir}: run directory not found")
    for name, value in (("steps", steps), ("num_examples", num_examples)):
        if value is not None and value <= 0:
            raise FtkitError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if sweep_steps and any(s <= 0 for s in sweep_steps):
        raise FtkitError(f"sweep steps must all be > 0, got {sweep_steps}")

    if base_only and checkpoint is not None:
        raise FtkitError("--base and --checkpoint exclude each other")
    run = _load_run(run_dir, adapter=not base_only, checkpoint=checkpoint)
    recipe = run.recipe
    cfg = recipe.eval
    cfg = dataclasses.replace(
        cfg,
        split=split or cfg.split,
        steps=steps or cfg.steps,
        num_examples=num_examples or cfg.num_examples,
        verifier_renoise=cfg.verifier_renoise if verifier_renoise is None else verifier_renoise,
    )
    size = min(cfg.num_examples, _split_size(recipe, cfg.split))
    if size <= 0:
        raise FtkitError(f"{run_dir}: the recipe's {cfg.split} split is empty (task.{cfg.split}_size)")
    examples = run.task.build_dataset(cfg.split, size, recipe.task.seed, recipe.task.data_path)

    sandbox = SandboxPolicy(allow_weak=cfg.allow_weak_sandbox)  # and records the isolation model code ran in

    def run_mode(with_verifier: bool, n_steps: int) -> EvalReport:
        with sandbox:
            return evaluate_examples(
                run.model, run.tokenizer, run.task, examples, dataclasses.replace(cfg, steps=n_steps),
                run.canvas_length, recipe.train.max_prompt_length, with_verifier,
            )

    primary = VERIFIER if cfg.verifier_renoise else PLAIN
    modes = {primary: run_mode(cfg.verifier_renoise, cfg.steps)}
    if compare_verifier:
        other = PLAIN if cfg.verifier_renoise else VERIFIER
        modes[other] = run_mode(not cfg.verifier_renoise, cfg.steps)
        modes = {k: modes[k] for k in (PLAIN, VERIFIER)}

    stem = "eval_base" if base_only else "eval" if checkpoint is None else f"eval_{Path(run.adapter_dir).name}"
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "task": recipe.task.name,
        "split": cfg.split,
        "adapter": not base_only,
        "base": recipe.model.base,
        "canvas_length": run.canvas_length,
        "num_examples": len(examples),
        "eval": dataclasses.asdict(cfg),
        "primary": primary,
        "metrics": modes[primary].metrics,
        "modes": {k: v.to_dict() for k, v in modes.items()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    if sweep_steps:
        points = []
        for n_steps in sorted(set(sweep_steps)):
            rep = modes[primary] if n_steps == cfg.steps else run_mode(cfg.verifier_renoise, n_steps)
            points.append({
                "steps": n_steps, "metrics": rep.metrics, "mean_steps_used": rep.mean_steps_used,
                "tokens_per_forward": rep.tokens_per_forward, "seconds": rep.seconds,
            })
        sweep = {"run_dir": str(run_dir), "mode": primary, "adapter": not base_only, "split": cfg.split,
                 "num_examples": len(examples), "points": points}
        write_json_atomic(run_dir / f"{stem}_sweep.json", sweep)
        from ftkit.plots import plot_metrics_vs_steps

        plot_metrics_vs_steps(points, run_dir / f"{stem}_sweep.png",
                              title=f"{recipe.task.name} ({cfg.split}, {'adapter' if not base_only else 'base'}, {primary})")
        report["sweep"] = points
        report["sweep_files"] = [f"{stem}_sweep.json", f"{stem}_sweep.png"]

    if sandbox.record():
        report["sandbox"] = sandbox.record()
    write_json_atomic(run_dir / f"{stem}.json", report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Display


def _split_metric(key: str) -> tuple[str, str]:
    name, _, stratum = key.partition("/")
    return name, stratum or "all"


def _fmt(name: str, value: float) -> str:
    if name.startswith("count"):
        return str(int(value))
    return f"{100 * value:.1f}%"


def render_table(report: dict[str, Any]):
    """A rich Table: metric rows, one column per stratum, a section per sampling mode, then speed rows.
    Accepts `evaluate_run`'s dict or a single `EvalReport.to_dict()`."""
    from rich.table import Table
    from rich.text import Text  # plain Text cells: metric names are not rich markup

    modes = report.get("modes") or {("verifier" if report.get("verifier_renoise") else "plain"): report}
    strata: list[str] = []
    for mode in modes.values():
        for key in mode["metrics"]:
            s = _split_metric(key)[1]
            if s not in strata:
                strata.append(s)
    strata.sort(key=lambda s: s != "all")

    title = "Evaluation"
    if "task" in report:
        title += f": {report['task']} ({report.get('split')}, {'adapter' if report.get('adapter', True) else 'base model'})"
    table = Table(title=Text(title))
    table.add_column("metric")
    for s in strata:
        table.add_column(s, justify="right")

    for mode_name, mode in modes.items():
        sampling = "verifier-guided" if mode.get("verifier_renoise") else "plain"
        table.add_row(Text(f"{sampling} sampling, {mode['steps']} steps", style="bold"), *[""] * len(strata))
        names: list[str] = []
        for key in mode["metrics"]:
            n = _split_metric(key)[0]
            if n not in names:
                names.append(n)
        for n in names:
            cells = []
            for s in strata:
                key = n if s == "all" else f"{n}/{s}"
                cells.append(_fmt(n, mode["metrics"][key]) if key in mode["metrics"] else "")
            table.add_row(Text(n), *cells)
        blank = [""] * (len(strata) - 1)
        table.add_row(Text("mean steps used"), f"{mode['mean_steps_used']:.1f}", *blank)
        table.add_row(Text("tokens per forward"), f"{mode['tokens_per_forward']:.2f}", *blank)
        table.add_row(Text("examples/s"), f"{mode['examples_per_second']:.2f}", *blank)
        table.add_row(Text("seconds"), f"{mode['seconds']:.1f}", *blank)
        if mode.get("verifier_renoise"):
            table.add_row(Text("re-noised cells"), str(mode["renoised_cells"]), *blank)
        table.add_section()
    return table
