"""Evaluation: lay examples out, denoise them in batches, decode, check and score with the task.

`evaluate_examples` works on in-memory pieces (model, tokenizer, task); `evaluate_run` loads a run directory and
evaluates it, optionally with a steps sweep and a plain-vs-verifier comparison.

Result files. `eval.json` is the run's canonical result: the recipe's own evaluation (its split and size, its steps
and sampling mode, the final adapter); it is what `ftkit push` publishes. Any other evaluation (--split, -n, --steps,
--verifier/--no-verifier, --token-masks/--no-token-masks, --checkpoint, --base, --data) writes a file named by what differs, e.g.
`eval_train_n2.json`, `eval_base.json`, `eval_checkpoint-100.json`, so a partial run never replaces the result a
user might publish (`result_name`). A run without final weights (stopped or still training) is evaluated on its
newest checkpoint and gets that checkpoint's file, never eval.json. Every result records which weights it measured
(`"weights"`: base, final or a checkpoint, with the sha256 of the weights), and `ftkit push` publishes eval.json only
when that hash is the one of the weights it uploads (`canonical_problems`).

Every example gets its own random generator seeded by (eval.seed, its index), so a result does not depend on the
batch size and two modes compared on the same seed share their first denoising pass exactly.

Compute in the comparison. A verifier-guided row may spend up to (1 + rounds) x steps decoder forwards per example,
so `--compare-verifier` reports decoder forwards per example for each row and adds an equal-forwards baseline:
plain sampling best-of-n, n = the verifier row's forwards / the plain row's (rounded), the sample the task's checker
flags least kept per example. Both use the same checker and about the same decoder forwards; one re-noises the
flagged positions, the other draws whole new samples.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ftkit.diffusion.blocks import denoise_blocks
from ftkit.diffusion.loss import core_model
from ftkit.diffusion.sample import DenoiseResult, denoise, row_generators, schedule_kwargs
from ftkit.diffusion.token_layout import canvas_to_text, layout_example, stop_token_ids, task_max_blocks
from ftkit.errors import FtkitError
from ftkit.recipe.schema import EvalSection
from ftkit.run.lock import holds_run_lock
from ftkit.run.paths import RunPaths
from ftkit.tasks.base import Example, Violation
from ftkit.tasks.data import load_examples
from ftkit.tasks.sandbox import SandboxPolicy

log = logging.getLogger(__name__)

MAX_RENOISE_ROUNDS = 2  # verifier rounds per batch; each round may spend the full `steps` budget again
PLAIN, VERIFIER, BEST_OF_N = "plain", "verifier", "plain_best_of_n"
CANONICAL = RunPaths.EVAL
# progress(label, examples done, examples total): called before the first batch and after each one.
Progress = Callable[[str, int, int], None]


@dataclass
class EvalReport:
    metrics: dict[str, float]
    outputs: list[str]
    records: list[dict[str, Any]]  # per example: id, output, violated constraints, steps used
    steps: int  # the step budget of one denoising pass
    verifier_renoise: bool
    mean_steps_used: float  # = decoder forwards per example (one decoder pass per step of that example)
    tokens_per_forward: float
    forward_passes: int  # batched decoder calls
    renoised_cells: int
    seconds: float
    examples_per_second: float
    num_examples: int = 0
    max_renoise_rounds: int = 0  # verifier rounds allowed after the first pass (0 for plain sampling)
    samples: int = 1  # independent samples per example (best-of-n)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_forwards_per_example(self) -> int:
        """The most decoder forwards one example may spend in this mode."""
        return self.steps * self.samples * (1 + (self.max_renoise_rounds if self.verifier_renoise else 0))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["decoder_forwards_per_example"] = self.mean_steps_used
        out["max_decoder_forwards_per_example"] = self.max_forwards_per_example
        return out

    def label(self) -> str:
        """What the row ran, with its compute: a verifier row is not "16 steps" when it may spend 48."""
        if self.samples > 1:
            return f"plain sampling, best of {self.samples} (up to {self.steps} steps each)"
        if self.verifier_renoise:
            return (
                f"verifier-guided sampling (up to {self.steps} steps, then up to {self.max_renoise_rounds} "
                f"re-noising rounds of up to {self.steps})"
            )
        return f"plain sampling (up to {self.steps} steps)"


# ----------------------------------------------------------------------------------------------------------------
# Scoring (no model involved: testable against ground truth)


def score_outputs(task, examples: list[Example], outputs: list[str]) -> tuple[dict[str, float], list[list[Violation]]]:
    """The task's aggregate metrics and each output's violations."""
    violations = [task.check(ex, out) for ex, out in zip(examples, outputs)]
    return task.metrics(examples, outputs), violations


def _token_char_starts(tokenizer, row: list[int], stop_ids) -> tuple[list[int], int, int]:
    """(first character offset of each token before the first stop token, that stop's index, decoded text length).

    Built from the *output* tokens, decoded one by one as `layout` does for the reference: with a subword tokenizer
    a wrong answer may tokenize differently from the reference, so the reference's char_starts would misplace it."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(row) if t in stops), len(row))
    starts, pos = [], 0
    for tid in row[:end]:
        starts.append(pos)
        pos += len(tokenizer.decode([tid], skip_special_tokens=True))
    return starts, end, pos


def char_positions_to_tokens(positions, starts: list[int], end: int, text_length: int, canvas_length: int) -> list[int]:
    """Canvas token indices holding the given character offsets. Offsets past the decoded text (a checker padding a
    short output) map to the positions from the first stop token on, one per character."""
    tokens = set()
    for c in positions:
        if c >= text_length:
            t = end + (c - text_length)
        else:
            t = bisect.bisect_right(starts, c) - 1
        if 0 <= t < canvas_length:
            tokens.add(t)
    return sorted(tokens)


def flagged_tokens(tokenizer, task, example: Example, row: list[int], stops) -> tuple[list[int], bool]:
    """(canvas token indices of the characters `task.check` flags in the decoded row, whether some violation has no
    positions: a global one such as "unparsable", which no token list can express)."""
    violations = task.check(example, canvas_to_text(tokenizer, row))
    chars = {p for v in violations for p in v.positions}
    starts, end, length = _token_char_starts(tokenizer, row, stops)
    return char_positions_to_tokens(chars, starts, end, length, len(row)), any(not v.positions for v in violations)


def make_verifier(tokenizer, task, examples: list[Example]) -> Callable[[torch.Tensor], list[list[int]]]:
    """A `denoise` verifier: decode each canvas, run task.check, map the violations' characters to tokens."""

    stops = stop_token_ids(tokenizer)

    def verify(canvas: torch.Tensor) -> list[list[int]]:
        return [flagged_tokens(tokenizer, task, ex, row, stops)[0] for ex, row in zip(examples, canvas.tolist())]

    return verify


def rows_verifier(tokenizer, task, examples: list[Example]) -> Callable[[list[int], torch.Tensor], list[list[int]]]:
    """`make_verifier` for `denoise_blocks`, which names the rows (indices into `examples`) it asks about."""

    def verify(rows: list[int], answers: torch.Tensor) -> list[list[int]]:
        return make_verifier(tokenizer, task, [examples[r] for r in rows])(answers)

    return verify


# ----------------------------------------------------------------------------------------------------------------
# Batching and sampling


def _lay_out(task, tokenizer, examples: list[Example], canvas_length: int, max_prompt_length: int):
    """(examples, layouts); an example that does not fit is an error, or skipped and counted for a task whose
    `skip_bad_rows` is true (as in training)."""
    max_blocks = task_max_blocks(task)
    kept, layouts, skipped = [], [], []
    for ex in examples:
        try:
            layouts.append(
                layout_example(
                    tokenizer, task.to_prompt_canvas(ex), canvas_length, max_prompt_length, ex.id, max_blocks
                )
            )
            kept.append(ex)
        except FtkitError as e:
            if not getattr(task, "skip_bad_rows", False):
                raise
            skipped.append(str(e))
    if skipped:
        log.warning(
            "evaluation: skipped %d of %d example(s) that do not fit the model (first: %s)",
            len(skipped),
            len(examples),
            skipped[0],
        )
    if not kept:
        raise FtkitError("evaluation: no example fits the model (see the warning above)")
    return kept, layouts


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
    progress: Progress | None = None,
    label: str = "eval",
) -> EvalReport:
    """Denoise every example (batches of eval_cfg.batch_size, block after block for answers longer than one canvas),
    decode and score. `sampler` is `denoise` unless a test swaps it; `progress(label, done, total)` is told after
    every batch."""
    if not examples:
        raise FtkitError("evaluation: no examples to evaluate")
    model.eval()
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = core_model(model).config.get_text_config().vocab_size if eval_cfg.token_masks else None
    examples, layouts = _lay_out(task, tokenizer, examples, canvas_length, max_prompt_length)

    outputs: list[str] = []
    steps_used: list[int] = []
    blocks: list[int] = []
    tpf_weighted, passes, renoised = 0.0, 0, 0
    started = time.perf_counter()
    if progress is not None:
        progress(label, 0, len(examples))
    for start in range(0, len(examples), eval_cfg.batch_size):
        batch_examples = examples[start : start + eval_cfg.batch_size]
        result = denoise_blocks(
            model,
            layouts[start : start + eval_cfg.batch_size],
            generators=row_generators(eval_cfg.seed, len(batch_examples), device, offset=start),
            max_new_tokens=eval_cfg.max_new_tokens or canvas_length,
            stop_ids=stop_token_ids(tokenizer),
            pad_id=pad_id,
            verifier=rows_verifier(tokenizer, task, batch_examples) if verifier_renoise else None,
            vocab_size=vocab,
            sampler=sampler,
            steps=eval_cfg.steps,
            **schedule_kwargs(eval_cfg),
            clamp=eval_cfg.clamp,
            max_renoise_rounds=max_renoise_rounds,
        )
        outputs.extend(canvas_to_text(tokenizer, row) for row in result.tokens)
        steps_used.extend(result.steps_used)
        blocks.extend(result.blocks)
        tpf_weighted += result.tokens_per_forward * len(batch_examples)
        passes += result.forward_passes
        renoised += result.renoised_cells
        if progress is not None:
            progress(label, len(outputs), len(examples))

    metrics, violations = score_outputs(task, examples, outputs)
    seconds = time.perf_counter() - started
    records = [
        {
            "id": ex.id,
            "output": out,
            "violations": sorted({v.constraint for v in vs}),
            "steps_used": used,
            "blocks": n_blocks,
        }
        for ex, out, vs, used, n_blocks in zip(examples, outputs, violations, steps_used, blocks)
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
        max_renoise_rounds=max_renoise_rounds if verifier_renoise else 0,
    )


def sample_seed(seed: int, sample: int) -> int:
    """The eval seed of the `sample`-th independent sample (sample 0 is the seed itself)."""
    return seed if sample == 0 else (seed + 1) * 1_000_033 + sample


def _flagged(task, example: Example, output: str) -> tuple[int, int]:
    """How much the task's checker flags an output: (violated constraints, flagged positions)."""
    violations = task.check(example, output)
    return len(violations), sum(len(v.positions) for v in violations)


def best_of_n(task, examples: list[Example], samples: list[EvalReport]) -> EvalReport:
    """Per example, the sample the task's checker flags least (fewest violated constraints, then fewest flagged
    positions; the first on ties), scored as one report; its decoder forwards are those of all samples."""
    outputs, records, steps_used = [], [], []
    for i, ex in enumerate(examples):
        candidates = [rep.outputs[i] for rep in samples]
        counts = [_flagged(task, ex, out) for out in candidates]
        k = counts.index(min(counts))
        outputs.append(candidates[k])
        used = sum(rep.records[i]["steps_used"] for rep in samples)
        records.append({**samples[k].records[i], "steps_used": used, "sample": k})
        steps_used.append(used)
    metrics, _ = score_outputs(task, examples, outputs)
    n = len(examples)
    seconds = sum(rep.seconds for rep in samples)
    return EvalReport(
        metrics=metrics,
        outputs=outputs,
        records=records,
        steps=samples[0].steps,
        verifier_renoise=False,
        mean_steps_used=sum(steps_used) / n,
        # Kept tokens per decoder forward of all samples: the discarded samples' forwards count too.
        tokens_per_forward=sum(rep.tokens_per_forward for rep in samples) / len(samples) ** 2,
        forward_passes=sum(rep.forward_passes for rep in samples),
        renoised_cells=0,
        seconds=seconds,
        examples_per_second=n / seconds if seconds > 0 else float("inf"),
        num_examples=n,
        samples=len(samples),
    )


# ----------------------------------------------------------------------------------------------------------------
# Run directories


def write_json_atomic(path: Path, data: Any) -> Path:
    """Readers never see half a report (see `ftkit.run.rundir.atomic_write_json`)."""
    from ftkit.run.rundir import atomic_write_json

    return atomic_write_json(path, data)


def _load_run(run_dir: Path, adapter: bool, checkpoint: str | None = None):
    # Late import: rundir pulls in the model loaders; tests replace this function with in-memory pieces.
    from ftkit.run.rundir import load_run

    return load_run(run_dir, trained=adapter, checkpoint=checkpoint)


DATA_FILE_LIMIT = 1_000_000  # --data without -n: every example of the file


def _split_size(recipe, split: str) -> int:
    if split == "test":
        return recipe.task.test_size
    if split == "train":
        return recipe.task.train_size
    raise FtkitError(f"evaluation split {split!r}: expected 'test' or 'train'")


def canonical_size(recipe) -> int:
    """How many examples the recipe's own evaluation asks for."""
    return min(recipe.eval.num_examples, _split_size(recipe, recipe.eval.split))


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def result_name(
    recipe,
    cfg: EvalSection,
    size: int | None,
    *,
    base: bool = False,
    checkpoint: str | None = None,
    data_path: str | None = None,
    full: bool = False,
) -> tuple[str, list[str]]:
    """(file stem, what differs from the recipe's own evaluation). No differences: "eval", the canonical result.
    `size` None: every example of `data_path` (no size in the name)."""
    own = recipe.eval
    parts, why = [], []
    if base:
        parts.append("base")
        why.append(
            "the untrained base model (a full run: its initial weights)"
            if full
            else "the base model without the adapter"
        )
    if checkpoint is not None:
        parts.append(_name_part(checkpoint))
        why.append(f"{'model' if full else 'adapter'} of {checkpoint}")
    if data_path is not None:
        parts.append("data-" + _name_part(Path(data_path).stem))
        why.append(f"data {data_path}")
    if data_path is None and cfg.split != own.split:
        parts.append(_name_part(cfg.split))
        why.append(f"split {cfg.split}")
    if size is not None and (data_path is not None or size != canonical_size(recipe)):
        parts.append(f"n{size}")
        why.append(f"{size} examples")
    if cfg.steps != own.steps:
        parts.append(f"steps{cfg.steps}")
        why.append(f"{cfg.steps} steps")
    if cfg.verifier_renoise != own.verifier_renoise:
        parts.append(VERIFIER if cfg.verifier_renoise else PLAIN)
        why.append("verifier-guided" if cfg.verifier_renoise else "plain sampling")
    if cfg.token_masks != own.token_masks:
        parts.append("masked" if cfg.token_masks else "unmasked")
        why.append("with token masks" if cfg.token_masks else "without token masks")
    if cfg.max_new_tokens != own.max_new_tokens:
        parts.append(f"tokens{cfg.max_new_tokens}")
        why.append(f"an answer budget of {cfg.max_new_tokens} tokens")
    return ("eval_" + "_".join(parts) if parts else "eval"), why


def file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_answer_budget(task, max_new_tokens: int | None) -> None:
    """--max-new-tokens only means something for a task whose answers run block after block; elsewhere the answer's
    length is fixed by its pieces, and a flag that changes nothing is an error, not silently ignored."""
    if max_new_tokens is not None and task_max_blocks(task) is not None:
        raise FtkitError(
            f"--max-new-tokens: a {task.name} answer has a fixed length (one canvas), so an answer "
            "budget changes nothing; it applies to tasks whose answers run block after block (chat)"
        )


def measured_weights(run_dir: Path, recipe, base_only: bool, adapter_dir) -> dict[str, Any]:
    """Which weights an evaluation measures, as its result records them: the base model, the run's final adapter
    (or full model), or a checkpoint's; with the sha256 of the trained weights (`rundir.weights_sha256`)."""
    from ftkit.run.rundir import weights_sha256

    if base_only:
        return {"source": "base", "model": recipe.model.base}
    folder = Path(adapter_dir) if adapter_dir is not None else run_dir
    final = folder.resolve() == run_dir.resolve()
    out: dict[str, Any] = {"source": "final" if final else "checkpoint"}
    if not final:
        out["checkpoint"] = folder.name
    try:
        path = (folder / RunPaths.weights_file(recipe.is_full)).relative_to(run_dir)
    except ValueError:  # a checkpoint given as a path outside the run
        path = folder / RunPaths.weights_file(recipe.is_full)
    out["file"] = path.as_posix()
    out["sha256"] = weights_sha256(folder, recipe.is_full)
    return out


def canonical_problems(report: dict[str, Any], recipe, run_dir: Path) -> list[str]:
    """Why `report` (a run's eval.json) is not the recipe's own evaluation of the run's final adapter; [] if it is.
    Checked from its content, so an eval.json written by an older ftkit or copied in is judged the same way: one
    that does not record the hash of the weights it measured, or another hash than the run's final weights have, is
    not the evaluation of the weights `ftkit push` uploads."""
    from ftkit.run.rundir import weights_sha256

    weights = RunPaths.weights_file(recipe.is_full)
    problems = []
    cfg = report.get("eval") if isinstance(report.get("eval"), dict) else {}
    own = recipe.eval
    if report.get("adapter") is not True or report.get("checkpoint"):
        problems.append(
            "it evaluates "
            + ("the base model" if report.get("adapter") is False else f"checkpoint {report.get('checkpoint')}")
        )
    if cfg.get("split") != own.split:
        problems.append(f"split {cfg.get('split')!r}, the recipe's is {own.split!r}")
    if report.get("num_examples_requested", report.get("num_examples")) != canonical_size(recipe):
        problems.append(f"{report.get('num_examples')} examples, the recipe's evaluation has {canonical_size(recipe)}")
    if cfg.get("steps") != own.steps:
        problems.append(f"{cfg.get('steps')} steps, the recipe's are {own.steps}")
    if bool(cfg.get("verifier_renoise")) != own.verifier_renoise:
        problems.append("another sampling mode than the recipe's")
    if cfg.get("max_new_tokens", own.max_new_tokens) != own.max_new_tokens:
        problems.append(f"an answer budget of {cfg.get('max_new_tokens')} tokens, the recipe's is {own.max_new_tokens}")
    if bool(cfg.get("token_masks", own.token_masks)) != own.token_masks:
        problems.append("token masks " + ("on" if cfg.get("token_masks") else "off") + ", unlike the recipe")
    if report.get("data_path"):
        problems.append(f"data {report['data_path']}")
    made_with = report.get("adapter_sha256")
    holds = weights_sha256(run_dir, recipe.is_full)
    if holds is None:
        problems.append(f"the run has no final {weights}")
    elif made_with is None:
        problems.append(
            f"it does not record which weights it measured (no hash of {weights}: made before the run "
            "had its final weights, or by an older ftkit)"
        )
    elif made_with != holds:
        problems.append(f"it was made with another {weights} than the run holds now")
    return problems


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
    data_path: str | None = None,
    progress: Progress | None = None,
    token_masks: bool | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run and write the result into it; return the same dict, whose "file" names the file written.

    The recipe's own evaluation writes `eval.json`; anything else a file named by what differs (`result_name`).
    `checkpoint`: a name under checkpoints/, a path, or `latest`. `data_path`: every example of another data file of
    the task's format (up to `num_examples`), read as `task.data_path` would be, instead of a split of the recipe's. With `sweep_steps`, the primary mode is also evaluated at each step count (`<stem>_sweep.json`,
    `.png`). With `compare_verifier`, plain and verifier-guided sampling run on the same examples and seeds, plus
    plain best-of-n at the verifier row's decoder forwards; all are stored under `modes`.
    """
    from ftkit.run.rundir import require_directory

    run_dir = require_directory(run_dir)
    for name, value in (("steps", steps), ("num_examples", num_examples), ("max_new_tokens", max_new_tokens)):
        if value is not None and value <= 0:
            raise FtkitError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if sweep_steps and any(s <= 0 for s in sweep_steps):
        raise FtkitError(f"sweep steps must all be > 0, got {sweep_steps}")
    if data_path is not None:
        if split is not None:
            raise FtkitError("--data and --split exclude each other: --data evaluates the whole file")
        if not Path(data_path).exists():
            raise FtkitError(f"--data {data_path}: file not found")

    if base_only and checkpoint is not None:
        raise FtkitError("--base and --checkpoint exclude each other")
    run = _load_run(run_dir, adapter=not base_only, checkpoint=checkpoint)
    recipe = run.recipe
    check_answer_budget(run.task, max_new_tokens)
    from ftkit.run.threads import apply_threads

    threads = apply_threads(recipe.train.cpu_threads)
    cfg = recipe.eval
    cfg = dataclasses.replace(
        cfg,
        split=split or cfg.split,
        steps=steps or cfg.steps,
        num_examples=num_examples or cfg.num_examples,
        verifier_renoise=cfg.verifier_renoise if verifier_renoise is None else verifier_renoise,
        token_masks=cfg.token_masks if token_masks is None else token_masks,
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
    )
    if data_path is not None:
        cfg = dataclasses.replace(cfg, split="all")
        size = num_examples or DATA_FILE_LIMIT
        examples = load_examples(run.task, "all", size, recipe.task.seed, data_path, say_fewer=num_examples is not None)
        if not examples:
            raise FtkitError(f"--data {data_path}: no examples in it")
        size = num_examples  # the name says a size only when one was asked for
    else:
        size = min(cfg.num_examples, _split_size(recipe, cfg.split))
        if size <= 0:
            raise FtkitError(f"{run_dir}: the recipe's {cfg.split} split is empty (task.{cfg.split}_size)")
        examples = load_examples(run.task, cfg.split, size, recipe.task.seed, recipe.task.data_path)
    weights = measured_weights(run_dir, recipe, base_only, getattr(run, "weights_dir", None))
    checkpoint_name = weights.get("checkpoint")
    notes = []
    if checkpoint is None and checkpoint_name is not None:
        # Training has not finished: what exists is a checkpoint, whose result must never pass for the final one.
        notes.append(
            f"the run has no final {'model' if recipe.is_full else 'adapter'} yet (training has not "
            f"finished): this evaluated its newest checkpoint, {checkpoint_name}"
        )
    if data_path is None and num_examples is not None and len(examples) < num_examples:
        notes.append(
            f"-n {num_examples}: the {cfg.split} split has {len(examples)} examples (task.{cfg.split}_size); "
            "evaluated all of them"
        )
    from ftkit.run.rundir import say

    for note in notes:
        say(f"note: {note}")
    stem, differences = result_name(
        recipe, cfg, size, base=base_only, checkpoint=checkpoint_name, data_path=data_path, full=recipe.is_full
    )

    sandbox = SandboxPolicy(allow_weak=cfg.allow_weak_sandbox)  # and records the isolation model code ran in

    def run_mode(with_verifier: bool, n_steps: int, seed: int = cfg.seed, label: str | None = None) -> EvalReport:
        with sandbox:
            return evaluate_examples(
                run.model,
                run.tokenizer,
                run.task,
                examples,
                dataclasses.replace(cfg, steps=n_steps, seed=seed),
                run.canvas_length,
                recipe.train.max_prompt_length,
                with_verifier,
                progress=progress,
                label=label or (VERIFIER if with_verifier else PLAIN),
            )

    primary = VERIFIER if cfg.verifier_renoise else PLAIN
    modes = {primary: run_mode(cfg.verifier_renoise, cfg.steps)}
    if compare_verifier:
        other = PLAIN if cfg.verifier_renoise else VERIFIER
        modes[other] = run_mode(not cfg.verifier_renoise, cfg.steps)
        modes = {k: modes[k] for k in (PLAIN, VERIFIER)}
        n = max(1, round(modes[VERIFIER].mean_steps_used / max(modes[PLAIN].mean_steps_used, 1e-9)))
        if n > 1:
            samples = [modes[PLAIN]] + [
                run_mode(False, cfg.steps, sample_seed(cfg.seed, k), label=f"{BEST_OF_N} ({k + 1}/{n})")
                for k in range(1, n)
            ]
            modes[BEST_OF_N] = best_of_n(run.task, examples, samples)
        else:
            notes.append("no best-of-n row: the verifier row spent about the plain row's decoder forwards (n = 1)")

    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "file": f"{stem}.json",
        "canonical": stem == "eval",
        "differs_from_recipe": differences,
        "task": recipe.task.name,
        "split": cfg.split,
        "adapter": not base_only,
        "full_model": recipe.is_full,  # the run trained every weight: "adapter" means its trained model
        "checkpoint": checkpoint_name,
        "weights": weights,  # exactly what was measured: base, final or checkpoint, with the weights' sha256
        "data_path": data_path,
        "base": recipe.model.base,
        "canvas_length": run.canvas_length,
        "num_examples": len(examples),
        "num_examples_requested": size if size is not None else len(examples),
        "eval": dataclasses.asdict(cfg),
        "primary": primary,
        "metrics": modes[primary].metrics,
        "modes": {k: v.to_dict() for k, v in modes.items()},
        "notes": notes,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_threads": threads.threads,
    }
    if weights["source"] == "final":
        # The final trained weights evaluated (the adapter's, or a full run's model), under the key push checks.
        report["adapter_sha256"] = weights["sha256"]

    if sweep_steps:
        points = []
        for n_steps in sorted(set(sweep_steps)):
            rep = (
                modes[primary]
                if n_steps == cfg.steps
                else run_mode(cfg.verifier_renoise, n_steps, label=f"sweep {n_steps} steps")
            )
            points.append(
                {
                    "steps": n_steps,
                    "metrics": rep.metrics,
                    "mean_steps_used": rep.mean_steps_used,
                    "tokens_per_forward": rep.tokens_per_forward,
                    "seconds": rep.seconds,
                }
            )
        sweep = {
            "run_dir": str(run_dir),
            "mode": primary,
            "adapter": not base_only,
            "split": cfg.split,
            "num_examples": len(examples),
            "points": points,
        }
        write_json_atomic(run_dir / f"{stem}_sweep.json", sweep)
        from ftkit.run.plots import plot_metrics_vs_steps

        plot_metrics_vs_steps(
            points,
            run_dir / f"{stem}_sweep.png",
            title=f"{recipe.task.name} ({cfg.split}, {'adapter' if not base_only else 'base'}, {primary})",
        )
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


def _mode_label(mode: dict[str, Any]) -> str:
    """EvalReport.label for a report dict (also one written by an older ftkit, without the compute fields)."""
    fields = {f.name for f in dataclasses.fields(EvalReport)}
    try:
        return EvalReport(**{k: v for k, v in mode.items() if k in fields}).label()
    except TypeError:
        return f"{'verifier-guided' if mode.get('verifier_renoise') else 'plain'} sampling"


def describe_file(report: dict[str, Any]) -> str:
    """A line per file `evaluate_run` wrote: the canonical result or a file named by how it differs, then the
    sweep's own files (--sweep-steps)."""
    run_dir = Path(report["run_dir"])
    path = run_dir / report["file"]
    weights = report.get("weights") or {}
    measured = f" of {weights['checkpoint']}" if weights.get("source") == "checkpoint" else ""
    if report.get("canonical"):
        lines = [f"wrote {path}: the run's own evaluation (published by `ftkit push`)"]
    else:
        lines = [
            f"wrote {path}{measured} ({', '.join(report.get('differs_from_recipe') or [])}); the run's own "
            f"result {CANONICAL} is not touched"
        ]
    sweep = report.get("sweep_files") or []
    if sweep:
        steps = ", ".join(str(p["steps"]) for p in report.get("sweep") or [])
        what = {".json": f"the metrics at each step count ({steps})", ".png": "their plot against steps"}
        lines += [
            f"wrote {run_dir / name}: {what.get(Path(name).suffix, 'the sweep')}, with the settings of {report['file']}"
            for name in sweep
        ]
    return "\n".join(lines)


def render_sweep(report: dict[str, Any]):
    """A rich Table of a --sweep-steps report: one row per step count, its overall metrics and compute."""
    from rich.table import Table
    from rich.text import Text

    points = report.get("sweep") or []
    names = [k for k in (points[0]["metrics"] if points else {}) if "/" not in k and not k.startswith("count")]
    table = Table(title=Text(f"Steps sweep ({report.get('primary', 'plain')} sampling, same examples and seeds)"))
    for col in ("steps", *names, "decoder forwards / example", "seconds"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(
            str(p["steps"]),
            *[_fmt(n, p["metrics"][n]) for n in names],
            f"{p['mean_steps_used']:.1f}",
            f"{p['seconds']:.1f}",
        )
    return table


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
        what = (
            "base model"
            if not report.get("adapter", True)
            else "trained full model"
            if report.get("full_model")
            else "adapter"
        )
        title += f": {report['task']} ({report.get('split')}, {what})"
    notes = report.get("notes") or []
    table = Table(title=Text(title), caption=Text("; ".join(notes)) if notes else None)
    table.add_column("metric")
    for s in strata:
        table.add_column(s, justify="right")

    for mode in modes.values():
        table.add_row(Text(_mode_label(mode), style="bold"), *[""] * len(strata))
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
        table.add_row(Text("decoder forwards / example"), f"{mode['mean_steps_used']:.1f}", *blank)
        table.add_row(Text("batched decoder calls"), str(mode["forward_passes"]), *blank)
        table.add_row(Text("tokens per forward"), f"{mode['tokens_per_forward']:.2f}", *blank)
        table.add_row(Text("examples/s"), f"{mode['examples_per_second']:.2f}", *blank)
        table.add_row(Text("seconds"), f"{mode['seconds']:.1f}", *blank)
        if mode.get("verifier_renoise"):
            table.add_row(Text("re-noised cells"), str(mode["renoised_cells"]), *blank)
        table.add_section()
    return table
