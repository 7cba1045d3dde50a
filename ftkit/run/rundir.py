"""A run directory (its layout: ftkit.run.paths.RunPaths): integrity checks, atomic writes, checkpoints and
loading a run back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.run import filecheck, manifest
from ftkit.run.paths import RunPaths


def weights_sha256(folder: Path, full: bool) -> str | None:
    """The hash that identifies the trained weights in `folder` (a run directory or one of its checkpoints), or None
    when it holds none: the weights file's sha256, or for a sharded full model the sha256 of its shards' names and
    hashes. An evaluation records it; `ftkit push` publishes an evaluation only when it matches the weights uploaded."""
    import hashlib

    if not full:
        names = [RunPaths.ADAPTER_WEIGHTS] if (folder / RunPaths.ADAPTER_WEIGHTS).is_file() else []
    else:
        names = [n for n in RunPaths.saved_model_files(folder, full=True) if n.endswith(".safetensors")]
    if not names:
        return None
    if len(names) == 1:
        return manifest.sha256(folder / names[0])
    return hashlib.sha256("".join(f"{n} {manifest.sha256(folder / n)}\n" for n in names).encode()).hexdigest()


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' own pattern (trainer_utils._re_checkpoint)


def say(message: str) -> None:
    """A one-line notice for the user (stderr, so it never mixes with a command's result on stdout)."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def parents_made_for(path: str | Path) -> Iterator[None]:
    """Create `path`'s missing parent folders for the block; if the block fails, remove those it created (while
    still empty), so a failed command leaves no folder behind."""
    made, folder = [], Path(path).parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for folder in reversed(made):
        folder.mkdir(exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Have `write(tmp)` fill a temp file beside `path`, fsync it, then os.replace it over `path`: readers see the
    old file or the new one, never half of one, and a failed write leaves the old file untouched (and no folder it
    made for it)."""
    path = Path(path)
    with parents_made_for(path):
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
    for pkg in (
        "ftkit",
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "bitsandbytes",
        "datasets",
        "tokenizers",
    ):
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


def require_directory(run_dir: str | Path) -> Path:
    """`run_dir` is a directory; a recipe given instead is named as one, with the run directory it writes."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        hint = ""
        if run_dir.suffix.lower() in (".yaml", ".yml"):
            try:
                from ftkit.recipe import read_yaml

                output_dir = (read_yaml(run_dir).get("train") or {}).get("output_dir")
            except (FtkitError, AttributeError):
                output_dir = None
            hint = (
                f": a recipe? Its run directory is {output_dir}, written by `ftkit train {run_dir}`"
                if output_dir
                else ": a recipe? Pass the run directory `ftkit train` writes (train.output_dir)"
            )
        raise FtkitError(f"{run_dir}: a file, not a run directory{hint}")
    if not run_dir.is_dir():
        raise FtkitError(f"{run_dir}: no such run directory")
    return run_dir


def require_run_dir(run_dir: str | Path) -> Path:
    run_dir = require_directory(run_dir)
    if not RunPaths(run_dir).recipe.is_file():
        raise FtkitError(f"{run_dir}: not an ftkit run directory (no {RunPaths.RECIPE}); run `ftkit train` first")
    return run_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_root = RunPaths(run_dir).checkpoints
    if not ckpt_root.is_dir():
        return None
    last = get_last_checkpoint(str(ckpt_root))
    return Path(last) if last else None


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.match(path.name).group(1))


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's `checkpoint-N` folders, newest first."""
    return _checkpoints_in(RunPaths(run_dir).checkpoints)


def _checkpoints_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step, reverse=True)


def move_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the way (Trainer's pattern no longer matches it); never delete it."""
    target = ckpt.with_name(RunPaths.DAMAGED_PREFIX + ckpt.name)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{RunPaths.DAMAGED_PREFIX}{ckpt.name}.{n}")
    os.replace(ckpt, target)
    return target


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `--resume` continues from: the newest one whose files match its manifest. Each damaged one
    met on the way is moved aside and reported, naming the file."""
    for ckpt in checkpoints(run_dir):
        damage = manifest.verify(ckpt)
        if damage is None:
            return ckpt
        aside = move_aside(ckpt)
        say(f"warning: {ckpt} is damaged ({damage}); moved it aside to {aside.name} and trying the one before")
    return None


def verified_weights_checkpoint(ckpt: Path, full: bool = False) -> Path:
    """A checkpoint about to be evaluated: its adapter (or full model) files must match its manifest (`--resume`
    makes the same check on every file)."""
    damage = manifest.verify(ckpt, only=RunPaths.weight_files(full))
    if damage is not None:
        older = [c.name for c in _checkpoints_in(ckpt.parent) if c != ckpt]
        hint = f"evaluate an earlier one (--checkpoint {older[0]})" if older else "no other checkpoint is left"
        raise FtkitError(f"{ckpt}: damaged ({damage}); {hint}; `ftkit train RECIPE --resume` moves it aside")
    return ckpt


def foreign_entries(run_dir: Path) -> list[str]:
    """What a directory holds if it is not one ftkit made: a run must not be written among unrelated files, nor
    clear files of theirs that happen to have a run file's name. A training command writes versions.json before
    anything else it keeps, so that file marks a run directory. The lock file does not: any command that takes it
    creates it (a failed one may leave it), so it is ignored rather than taken as a sign of a run."""
    if not run_dir.is_dir() or RunPaths(run_dir).versions.exists():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != RunPaths.LOCK)


def kept_results(run_dir: Path) -> list[str]:
    """What a run directory holds that a new attempt must not replace silently: checkpoints, the final adapter, the
    summary and evaluations."""
    names = [p.relative_to(run_dir).as_posix() for p in checkpoints(run_dir)]
    kept = (*RunPaths.adapter_files(), *RunPaths.full_model_files(), RunPaths.SUMMARY)
    names += [n for n in kept if (run_dir / n).exists()]
    names += sorted(p.name for p in run_dir.glob(RunPaths.EVAL_GLOB))
    return names


def clear_attempt(run_dir: Path, also: tuple[str, ...] = ()) -> list[str]:
    """Remove what an attempt that saved nothing worth keeping left behind (only files train writes, and the names
    in `also` that another command writes, e.g. `ftkit rl`; anything else in the directory, damaged checkpoints
    included, stays). Returns the names removed."""
    removed = []
    for name in (*RunPaths.attempt_files(), *also):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def final_weights_problem(run_dir: Path, full: bool = False) -> str | None:
    """What is wrong with the run's final adapter (or full model) files, or None when they are intact."""
    for name in RunPaths.weight_files(full):
        what = filecheck.problem(run_dir / name)
        if what:
            return f"{name}: {what}"
    return None


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Any
    model: Any
    tokenizer: Any
    task: Any
    canvas_length: int
    weights_dir: Path | None  # where the trained adapter or full model was loaded from; None: the base alone


def weights_location(run_dir: Path, checkpoint: str | None = None, full: bool = False) -> Path:
    """The final adapter (with `full`: the full model), or a named/`latest` checkpoint's; verified (FtkitError
    naming the damaged file)."""
    if checkpoint is None:
        if any((run_dir / n).exists() for n in (*RunPaths.weight_files(full), RunPaths.SUMMARY)):
            what = final_weights_problem(run_dir, full)
            if what:
                final = "model" if full else "adapter"
                raise FtkitError(
                    f"{run_dir}/{what}; evaluate a checkpoint instead (--checkpoint latest), or run "
                    f"`ftkit train RECIPE --resume` to write the final {final} again from the last one"
                )
            return run_dir
        last = latest_checkpoint(run_dir)
        if last is None:
            raise FtkitError(f"{run_dir}: no {'full model' if full else 'adapter'} and no checkpoint yet")
        return verified_weights_checkpoint(last, full)
    if checkpoint == "latest":
        last = latest_checkpoint(run_dir)
        if last is None:
            raise FtkitError(f"{run_dir}: no checkpoint yet")
        return verified_weights_checkpoint(last, full)
    path = Path(checkpoint)
    if not path.is_absolute() and not path.exists():
        path = RunPaths(run_dir).checkpoints / checkpoint
    if not path.is_dir():
        raise FtkitError(f"{path}: no such checkpoint")
    return verified_weights_checkpoint(path, full)


# Sections every recipe.yaml train has written holds. Keys inside a section may be missing (a run made by an older
# ftkit, before a key existed, gets its default), whole sections may not.
RECIPE_SECTIONS = ("model", "quant", "lora", "diffusion", "train", "task", "eval", "hub")


def load_run_recipe(run_dir: Path):
    """The run's recipe.yaml, checked for being cut short: train writes every section and ends the file with a
    newline (a cut inside a line loses it; a cut between lines loses the last section's keys at most)."""
    from ftkit.recipe import load_recipe, read_yaml

    path = RunPaths(run_dir).recipe
    fix = f"rewrite it with `ftkit validate RECIPE [OVERRIDES] > {path}` (the recipe and overrides of the run)"
    data = read_yaml(path)
    missing = [name for name in RECIPE_SECTIONS if not isinstance(data, dict) or name not in data]
    if missing or not path.read_bytes().endswith(b"\n"):
        what = f"no `{missing[0]}` section" if missing else "its last line is cut"
        raise FtkitError(f"{path}: incomplete ({what}; cut short?); {fix}")
    try:
        return load_recipe(path)
    except FtkitError as e:
        raise FtkitError(f"{e}; {fix}") from None


def check_run_inputs(run_dir: Path, recipe) -> None:
    """The run's tokenizer and (tiny preset) base weights are there and whole, so that loading them never fails
    half-way or goes looking for them on the Hub."""
    optional = (n for n in RunPaths.TOKENIZER_OPTIONAL if (run_dir / n).exists())
    for name in (*RunPaths.TOKENIZER_REQUIRED, *optional):
        what = filecheck.problem(run_dir / name)
        if what:
            raise FtkitError(
                f"{run_dir / name}: {what}; it is the run's copy of the base model's tokenizer: restore "
                "it from the base model (or a copy of the run)"
            )
    if recipe.is_random_init:
        base = RunPaths(run_dir).base
        weights = sorted(base.glob("*.safetensors")) or [base / RunPaths.FULL_WEIGHTS]
        for path in (base / RunPaths.FULL_CONFIG, *weights):
            what = filecheck.problem(path)
            if what:
                raise FtkitError(
                    f"{path}: {what}; these are the random-init base weights the adapter was trained "
                    "on: restore them from a copy of the run (`ftkit push` uploads them), or train again"
                )


def load_run_tokenizer(run_dir: Path):
    """The tokenizer train saved into the run (never the Hub's)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(run_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FtkitError(
            f"{run_dir}: cannot load the run's tokenizer ({e.__class__.__name__}: "
            f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
        ) from None


def load_run(
    run_dir: str | Path, trained: bool = True, checkpoint: str | None = None, device: str | None = None
) -> LoadedRun:
    """Recipe, tokenizer, base model (+ the run's LoRA adapter unless `trained=False`), task instance. A full run
    (train.trainable: full) loads its trained full model instead (`weights_dir` is then where it came from);
    `trained=False` gives its untrained base. Every run file is checked before it is read: a damaged or missing
    one is an FtkitError naming it and what to do."""
    import torch

    from ftkit.model import arch
    from ftkit.model.load import load_base, load_full_model
    from ftkit.tasks import make_task

    run_dir = require_run_dir(run_dir)
    recipe = load_run_recipe(run_dir)
    check_run_inputs(run_dir, recipe)
    weights_dir = weights_location(run_dir, checkpoint, full=recipe.is_full) if trained else None
    tokenizer = load_run_tokenizer(run_dir)
    if weights_dir is not None and recipe.is_full:
        model = load_full_model(recipe.model, weights_dir)
    else:
        model = load_base(recipe.model, recipe.quant, tokenizer, run_dir)
        if weights_dir is not None:
            model = load_adapter(model, weights_dir, shared_stacks=recipe.lora.shared_stacks)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if recipe.quant.mode == "none":  # a quantized base is already on its GPU (and cannot be moved)
        model = model.to(device)
    model.eval()
    task = make_task(recipe.task.name, recipe.task.options)
    return LoadedRun(run_dir, recipe, model, tokenizer, task, arch.canvas_length(model), weights_dir)


def load_adapter(base, adapter_dir: Path, trainable: bool = False, shared_stacks: bool = False):
    """PeftModel.from_pretrained with a clear error for an adapter made on another base model; on a base with 4-bit
    experts, PEFT's expert wrappers are bound to the quantized forward (plain ones would refuse to run).
    `trainable`: the adapter's tensors require grad (`ftkit rl` continues training it). `shared_stacks`: the
    adapter of a `lora.shared_stacks` run, whose encoder tensors are re-tied to the decoder's (so training it
    further keeps one adapter)."""
    from peft import PeftModel

    from ftkit.model.lora import expert_pattern_warning_silenced
    from ftkit.model.quant import bind_expert_lora

    try:
        with expert_pattern_warning_silenced():
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise FtkitError(
            f"{adapter_dir}: the adapter does not fit this base model (made for another base?): {first[:300]}"
        ) from None
    if shared_stacks:
        from ftkit.model.shared_stacks import share_stack_adapters

        try:
            share_stack_adapters(model, verify=True)
        except FtkitError as e:
            raise FtkitError(f"{adapter_dir}: {e}") from None
    bind_expert_lora(model)
    return model
