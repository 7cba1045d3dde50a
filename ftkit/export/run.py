"""`ftkit export RUN OUT`: a standalone model folder that plain transformers (and, tied, vLLM) loads without PEFT.

    OUT/
      config.json                     the base's config (untied form: tie_word_embeddings false), dtype set
      model*.safetensors (+ index)    base + LoRA update, or a full fine-tune's weights, in `dtype`
      generation_config.json          the run's eval sampler settings
      tokenizer files                 the run's tokenizer
      README.md                       model card
      eval.json                       the run's own evaluation of these weights, when it has one
      ftkit_export.json               what was exported from what (read by `ftkit push OUT`)

The base is read tensor by tensor from its safetensors files and the update is added on the CPU in fp32, so a 4-bit
run merges onto the bf16 checkpoint it was quantized from, with no GPU and without ever holding the whole model.
Everything is written into a staging folder beside OUT and moved into place at the end: OUT is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ftkit.errors import FtkitError
from ftkit.export.card import ExportFacts, generation_config, model_card
from ftkit.export.deltas import AdapterTensors, add_update, lora_targets
from ftkit.export.layout import TIED, UNTIED, output_plan, shard_plan, source_tensors
from ftkit.export.shards import write_shards
from ftkit.model.arch import tied_targets, untie
from ftkit.run import rundir
from ftkit.run.lock import holds_run_lock
from ftkit.run.paths import RunPaths

EXPORT_MANIFEST = "ftkit_export.json"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_SIZE = "4GB"


def export_form(recipe) -> str:
    """Tied when both stacks got one update (shared adapter, full fine-tune), else untied."""
    return TIED if recipe.is_full or recipe.lora.shared_stacks else UNTIED


def base_weights_dir(recipe, run_dir: Path) -> Path:
    """The folder holding the base model's config and safetensors: the run's base/ (presets), a local directory,
    or the hub snapshot (from the cache when it is there, as training loaded it)."""
    from ftkit.model.load import resolve_base

    source = resolve_base(recipe.model, run_dir)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source,
                revision=recipe.model.revision,
                allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"],
            )
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise FtkitError(
            f"model.base={source!r}: cannot get the base weights to merge onto "
            f"({e.__class__.__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
        ) from None


def _load_config(folder: Path):
    from transformers import DiffusionGemmaConfig

    try:
        return DiffusionGemmaConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise FtkitError(f"{folder}/config.json: not a DiffusionGemma config ({e.__class__.__name__}: {e})") from None


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FtkitError(f"{out}: exists and is not an empty directory; export into a new directory")


@holds_run_lock("export")
def export_run(
    run_dir,
    out,
    checkpoint: str | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    on_note=None,
) -> dict[str, Any]:
    """Export the run's final weights (or `checkpoint`'s) into `out`; returns what ftkit_export.json records."""
    from transformers.utils.hub import convert_file_size_to_int

    run_dir, out = rundir.require_run_dir(run_dir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise FtkitError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    try:
        max_bytes = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise FtkitError(f"--max-shard-size {max_shard_size!r}: expected a size such as 4GB or 500MB") from None
    _check_out(out)
    recipe = rundir.load_run_recipe(run_dir)
    rundir.check_run_inputs(run_dir, recipe)
    weights_dir = rundir.weights_location(run_dir, checkpoint, full=recipe.is_full)
    base_dir = weights_dir if recipe.is_full else base_weights_dir(recipe, run_dir)
    config = _load_config(base_dir)
    form = export_form(recipe)

    ties = tied_targets(config)
    adapter = targets = None
    if not recipe.is_full:
        adapter, targets = AdapterTensors(weights_dir), lora_targets(config, weights_dir)
        if form == TIED:
            targets = _tied_updates(targets, ties, adapter)
    plan = output_plan(source_tensors(base_dir), ties, form, EXPORT_DTYPES[dtype])
    unknown = sorted(set(targets or {}) - {t.key for t in plan})
    if unknown:
        raise FtkitError(f"{weights_dir}: the adapter updates {unknown[0]}, which {base_dir} does not hold")

    def make(tensor, reader):
        weight = reader.tensor(tensor.source.file, tensor.source.key)
        target = (targets or {}).get(tensor.key)
        if target is None:
            return weight.to(tensor.dtype, copy=True)  # a copy: the reader may hand out one tensor per key twice
        return add_update(weight, target, adapter, tensor.dtype)

    out_config = untie(config) if form == UNTIED else config
    out_config.dtype = EXPORT_DTYPES[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        notes = on_note or (lambda text: None)
        write_shards(staging, shard_plan(plan, max_bytes), make, on_shard=lambda i, n: notes(f"wrote shard {i}/{n}"))
        out_config.save_pretrained(str(staging))
        generation_config(base_dir, recipe).save_pretrained(str(staging))
        rundir.load_run_tokenizer(run_dir).save_pretrained(str(staging))
        evaluation = _own_evaluation(run_dir, recipe, checkpoint, notes)
        if evaluation is not None:
            shutil.copyfile(RunPaths(run_dir).eval, staging / RunPaths.EVAL)
        facts = ExportFacts(
            form=form,
            dtype=dtype,
            source="full" if recipe.is_full else "adapter",
            base=str(base_dir),
            checkpoint=checkpoint,
            evaluation=evaluation,
        )
        summary = _read_json(RunPaths(run_dir).summary)
        (staging / "README.md").write_text(model_card(recipe, summary, facts, out.name), encoding="utf-8")
        record = _manifest(run_dir, weights_dir, recipe, facts, staging)
        rundir.atomic_write_json(staging / EXPORT_MANIFEST, record)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _tied_updates(targets: dict, ties: dict[str, str], adapter: AdapterTensors) -> dict:
    """The tied form writes each tied tensor once, so a tie target's update must be its source's (a shared-stacks
    adapter); returns the updates of the tensors the tied form writes."""
    kept = {}
    for tensor, target in targets.items():
        source = ties.get(tensor)
        if source is None:
            kept[tensor] = target
            continue
        twin = targets.get(source)
        if twin is None or not adapter.same_factors(target, twin):
            raise FtkitError(
                f"{adapter.path}: {tensor} and the tensor it is tied to ({source}) carry different "
                "LoRA updates, so the tied layout cannot hold them: the run was not trained with "
                "lora.shared_stacks"
            )
    return kept


def _own_evaluation(run_dir: Path, recipe, checkpoint: str | None, note) -> dict[str, Any] | None:
    """The run's canonical eval.json, if it evaluated the weights being exported."""
    from ftkit.evaluation.result_files import canonical_problems

    path = RunPaths(run_dir).eval
    if not path.is_file():
        note("no eval.json in the run: the card says the export was not evaluated (run `ftkit eval RUN` first)")
        return None
    if checkpoint is not None:
        note(f"eval.json left out: it evaluates the run's final weights, not {checkpoint}")
        return None
    report = _read_json(path)
    problems = canonical_problems(report, recipe, run_dir)
    if problems:
        note(f"eval.json left out: it is not the run's own evaluation ({'; '.join(problems)})")
        return None
    return report


def _manifest(run_dir: Path, weights_dir: Path, recipe, facts: ExportFacts, folder: Path) -> dict[str, Any]:
    from ftkit.evaluation.result_files import file_sha256

    weights = weights_dir / RunPaths.weights_file(recipe.is_full)
    return {
        "format": 1,
        "run": str(run_dir.resolve()),
        "checkpoint": facts.checkpoint,
        "task": recipe.task.name,
        "base_model": recipe.model.base,
        "base_weights": facts.base,
        "weights": "full" if recipe.is_full else "adapter",
        "weights_sha256": file_sha256(weights),
        "form": facts.form,
        "dtype": facts.dtype,
        "eval": RunPaths.EVAL if facts.evaluation is not None else None,
        "files": sorted([p.name for p in folder.iterdir() if p.is_file()] + [EXPORT_MANIFEST]),
        "versions": rundir.library_versions(),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
