"""A run directory: what `ftkit train` writes and what `eval`, `generate` and `push` read.

    runs/NAME/
      recipe.yaml                     the resolved recipe (overrides applied)
      adapter_config.json             the final PEFT adapter (standard format)
      adapter_model.safetensors
      config.json, model.safetensors  instead of the adapter with train.trainable=full: the full model
      tokenizer*.json                 the tokenizer used
      base/                           presets (tiny, small) only: the random-init base weights
      checkpoints/checkpoint-N/       Trainer checkpoints (adapter, optimizer, RNG, state), written atomically
      train_log.jsonl                 one JSON object per logging step
      noise_loss.jsonl                (noise level t, canvas loss) per training example
      loss.png, noise_loss.png        plots
      versions.json, summary.json     library versions; loss before/after, speed, parameter counts
      eval.json                       written by `ftkit eval`
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftkit.errors import FtkitError

RECIPE_FILE = "recipe.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_CONFIG = "config.json"  # a full model (train.trainable: full), as save_pretrained writes it
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
NOISE_LOG = "noise_loss.jsonl"
SUMMARY = "summary.json"
VERSIONS = "versions.json"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Have `write(tmp)` fill a temp file beside `path`, fsync it, then os.replace it over `path`: readers see the
    old file or the new one, never half of one, and a failed write leaves the old file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run files are meant to be read and pushed
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"  # serialize first: a bad value writes nothing
    return atomic_write_text(path, text)


def replace_dir(staging: Path, final: Path) -> None:
    """Move a fully written `staging` directory to `final` (same filesystem), replacing an existing one."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("ftkit", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: skip it
    return rows


def require_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FtkitError(f"{run_dir}: no such run directory")
    if not (run_dir / RECIPE_FILE).is_file():
        raise FtkitError(f"{run_dir}: not an ftkit run directory (no {RECIPE_FILE}); run `ftkit train` first")
    return run_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_root = run_dir / CHECKPOINTS
    if not ckpt_root.is_dir():
        return None
    last = get_last_checkpoint(str(ckpt_root))
    return Path(last) if last else None


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Any
    model: Any
    tokenizer: Any
    task: Any
    canvas_length: int
    adapter_dir: Path | None


def adapter_location(run_dir: Path, checkpoint: str | None = None, marker: str = ADAPTER_CONFIG) -> Path:
    """The final adapter, or a named/`latest` checkpoint's (with `marker=FULL_CONFIG`: the full model's)."""
    what = "adapter" if marker == ADAPTER_CONFIG else "full model"
    if checkpoint is None:
        if (run_dir / marker).is_file():
            return run_dir
        last = latest_checkpoint(run_dir)
        if last is None:
            raise FtkitError(f"{run_dir}: no {what} and no checkpoint yet")
        return last
    if checkpoint == "latest":
        last = latest_checkpoint(run_dir)
        if last is None:
            raise FtkitError(f"{run_dir}: no checkpoint yet")
        return last
    path = Path(checkpoint)
    if not path.is_absolute() and not path.exists():
        path = run_dir / CHECKPOINTS / checkpoint
    if not (path / marker).is_file():
        raise FtkitError(f"{path}: not a{'n' if what == 'adapter' else ''} {what} checkpoint (no {marker})")
    return path


def load_run(run_dir: str | Path, adapter: bool = True, checkpoint: str | None = None, device: str | None = None) -> LoadedRun:
    """Recipe, tokenizer, base model (+ the run's LoRA adapter unless `adapter=False`), task instance. A full run
    (train.trainable: full) loads its trained full model instead; `adapter=False` gives its untrained base."""
    import torch

    from ftkit.model import load_base, load_full_model, load_tokenizer
    from ftkit.recipe import load_recipe
    from ftkit.tasks import make_task

    run_dir = require_run_dir(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    tokenizer = load_tokenizer(recipe.model, run_dir)
    adapter_dir = None
    if adapter and recipe.is_full:
        adapter_dir = adapter_location(run_dir, checkpoint, marker=FULL_CONFIG)
        model = load_full_model(recipe.model, adapter_dir)
    else:
        model = load_base(recipe.model, recipe.quant, tokenizer, run_dir)
        if adapter:
            adapter_dir = adapter_location(run_dir, checkpoint)
            model = load_adapter(model, adapter_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if recipe.quant.mode != "4bit":
        model = model.to(device)
    model.eval()
    task = make_task(recipe.task.name, recipe.task.options)
    return LoadedRun(run_dir, recipe, model, tokenizer, task, int(model.config.canvas_length), adapter_dir)


def load_adapter(base, adapter_dir: Path):
    """PeftModel.from_pretrained with a clear error for an adapter made on another base model; on a base with 4-bit
    experts, PEFT's expert wrappers are bound to the quantized forward (plain ones would refuse to run)."""
    from peft import PeftModel

    from ftkit.model import expert_pattern_warning_silenced
    from ftkit.quant import bind_expert_lora

    try:
        with expert_pattern_warning_silenced():
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise FtkitError(
            f"{adapter_dir}: the adapter does not fit this base model (made for another base?): {first[:300]}"
        ) from None
    bind_expert_lora(model)
    return model
