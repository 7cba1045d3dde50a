"""Result files: which file an evaluation writes, which weights it measured, and whether it is the run's own.

`eval.json` is the run's canonical result: the recipe's own evaluation (its split and size, its steps and sampling
mode, the final adapter); it is what `ftkit push` publishes. Any other evaluation (--split, -n, --steps,
--verifier/--no-verifier, --token-masks/--no-token-masks, --checkpoint, --base, --data) writes a file named by what
differs, e.g. `eval_train_n2.json`, `eval_base.json`, `eval_checkpoint-100.json`, so a partial run never replaces
the result a user might publish (`result_name`). A run without final weights (stopped or still training) is
evaluated on its newest checkpoint and gets that checkpoint's file, never eval.json. Every result records which
weights it measured (`"weights"`: base, final or a checkpoint, with the sha256 of the weights, `measured_weights`),
and `ftkit push` publishes eval.json only when that hash is the one of the weights it uploads
(`canonical_problems`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.recipe import EvalSection
from ftkit.run.paths import RunPaths

CANONICAL = RunPaths.EVAL
PLAIN, VERIFIER, BEST_OF_N = "plain", "verifier", "plain_best_of_n"  # the sampling modes, as results name them


def write_json_atomic(path: Path, data: Any) -> Path:
    """Readers never see half a report (see `ftkit.run.rundir.atomic_write_json`)."""
    from ftkit.run.rundir import atomic_write_json

    return atomic_write_json(path, data)


def split_size(recipe, split: str) -> int:
    if split == "test":
        return recipe.task.test_size
    if split == "train":
        return recipe.task.train_size
    raise FtkitError(f"evaluation split {split!r}: expected 'test' or 'train'")


def canonical_size(recipe) -> int:
    """How many examples the recipe's own evaluation asks for."""
    return min(recipe.eval.num_examples, split_size(recipe, recipe.eval.split))


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
