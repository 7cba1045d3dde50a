"""Evaluating examples in memory: lay them out, denoise them in batches, decode, check and score with the task.

`evaluate_examples` works on in-memory pieces (model, tokenizer, task); `ftkit.evaluation.evaluate.evaluate_run`
calls it for a run directory. Every example gets its own random generator seeded by (eval.seed, its index), so a
result does not depend on the batch size and two modes compared on the same seed share their first denoising pass
exactly.

`best_of_n` combines independent plain samples (seeded by `sample_seed`) into one report: per example the sample the
task's checker flags least, the equal-forwards baseline of a verifier-guided row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ftkit.diffusion.blocks import denoise_blocks
from ftkit.diffusion.sample import DenoiseResult, denoise, row_generators
from ftkit.diffusion.token_layout import canvas_to_text, stop_token_ids
from ftkit.errors import FtkitError
from ftkit.evaluation.report import EvalReport
from ftkit.evaluation.verify import MAX_RENOISE_ROUNDS, rows_verifier
from ftkit.model import arch
from ftkit.recipe import EvalSection
from ftkit.tasks.base import Example, Violation
from ftkit.tasks.data import lay_out_examples, warn_skipped

log = logging.getLogger(__name__)

# progress(label, examples done, examples total): called before the first batch and after each one.
Progress = Callable[[str, int, int], None]


def score_outputs(task, examples: list[Example], outputs: list[str]) -> tuple[dict[str, float], list[list[Violation]]]:
    """The task's aggregate metrics and each output's violations."""
    violations = [task.check(ex, out) for ex, out in zip(examples, outputs)]
    return task.metrics(examples, outputs), violations


def _lay_out(task, tokenizer, examples: list[Example], canvas_length: int, max_prompt_length: int):
    """(examples, layouts); an example that does not fit is an error, or skipped and counted for a task whose
    `skip_bad_rows` is true (as in training)."""
    kept, layouts, skipped = lay_out_examples(task, tokenizer, examples, canvas_length, max_prompt_length)
    warn_skipped(log, skipped, len(examples), who="evaluation: ")
    if not kept:
        raise FtkitError("evaluation: no example fits the model (see the warning above)")
    return kept, layouts


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class _Sampled:
    """What denoising the batches gave: per example (outputs, steps used, blocks) and summed over batches."""

    outputs: list[str] = field(default_factory=list)
    steps_used: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    tpf_weighted: float = 0.0  # tokens per forward, weighted by each batch's examples
    passes: int = 0
    renoised: int = 0


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
    examples, layouts = _lay_out(task, tokenizer, examples, canvas_length, max_prompt_length)
    started = time.perf_counter()
    sampled = _denoise_batches(
        model,
        tokenizer,
        task,
        examples,
        layouts,
        eval_cfg,
        canvas_length,
        verifier_renoise,
        max_renoise_rounds=max_renoise_rounds,
        sampler=sampler,
        progress=progress,
        label=label,
    )
    metrics, violations = score_outputs(task, examples, sampled.outputs)
    seconds = time.perf_counter() - started
    n = len(examples)
    return EvalReport(
        metrics=metrics,
        outputs=sampled.outputs,
        records=_records(examples, sampled, violations),
        steps=eval_cfg.steps,
        verifier_renoise=verifier_renoise,
        mean_steps_used=sum(sampled.steps_used) / n,
        tokens_per_forward=sampled.tpf_weighted / n,
        forward_passes=sampled.passes,
        renoised_cells=sampled.renoised,
        seconds=seconds,
        examples_per_second=n / seconds if seconds > 0 else float("inf"),
        num_examples=n,
        max_renoise_rounds=max_renoise_rounds if verifier_renoise else 0,
    )


def _denoise_batches(
    model,
    tokenizer,
    task,
    examples: list[Example],
    layouts,
    eval_cfg: EvalSection,
    canvas_length: int,
    verifier_renoise: bool,
    *,
    max_renoise_rounds: int,
    sampler: Callable[..., DenoiseResult],
    progress: Progress | None,
    label: str,
) -> _Sampled:
    """Denoise the laid-out examples in batches of eval_cfg.batch_size and decode each row."""
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = arch.vocab_size(model) if eval_cfg.token_masks else None
    out = _Sampled()
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
            **eval_cfg.sampler_kwargs(),
            clamp=eval_cfg.clamp,
            max_renoise_rounds=max_renoise_rounds,
        )
        out.outputs.extend(canvas_to_text(tokenizer, row) for row in result.tokens)
        out.steps_used.extend(result.steps_used)
        out.blocks.extend(result.blocks)
        out.tpf_weighted += result.tokens_per_forward * len(batch_examples)
        out.passes += result.forward_passes
        out.renoised += result.renoised_cells
        if progress is not None:
            progress(label, len(out.outputs), len(examples))
    return out


def _records(examples: list[Example], sampled: _Sampled, violations: list[list[Violation]]) -> list[dict]:
    """Per example: its id, output, violated constraints, steps used and blocks."""
    return [
        {
            "id": ex.id,
            "output": out,
            "violations": sorted({v.constraint for v in vs}),
            "steps_used": used,
            "blocks": n_blocks,
        }
        for ex, out, vs, used, n_blocks in zip(
            examples, sampled.outputs, violations, sampled.steps_used, sampled.blocks
        )
    ]


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
