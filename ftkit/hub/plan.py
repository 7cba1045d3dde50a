"""What `ftkit push RUN` would publish, checked before anything is staged (`plan_push` -> `PushPlan`).

Only the run's canonical result is published: `eval.json`, the recipe's own evaluation of the final adapter
(`ftkit.evaluation.result_files.canonical_problems` says why a file is not). A run without one is refused unless
`allow_no_eval`; other result files (`eval_train_n2.json`, `eval_base.json`...) are never uploaded or cited. An
`ftkit rl` run (summary.json `"stage": "rl"`) also publishes its held-out before/after (`rl_eval.json`) when that
file evaluated the adapter the run holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.run import rundir
from ftkit.run.paths import RunPaths, is_rl_summary

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PLACEHOLDER_REPO = "YOUR_USER/YOUR_REPO"


@dataclass(frozen=True)
class PushPlan:
    run_dir: Path
    recipe: Any
    repo: str | None
    private: bool
    evaluation: dict[str, Any] | None = None  # the canonical eval.json, or None (pushed with allow_no_eval)
    # The run's weights are the whole model, not a LoRA adapter (a full fine-tune): changes the card's library,
    # title, warning and loading code.
    full_model: bool = False
    notes: tuple[str, ...] = ()  # what the push left out, for the user
    # An RL run's rl_eval.json (held-out before/after RL), when it evaluated the adapter the run holds.
    rl_comparison: dict[str, Any] | None = None


def plan_push(
    run_dir: Path,
    repo: str | None = None,
    private: bool | None = None,
    need_repo: bool = True,
    allow_no_eval: bool = False,
) -> PushPlan:
    """Check the run and what would be pushed; every refusal is one FtkitError saying what to do."""
    from ftkit.recipe import load_recipe

    run_dir = rundir.require_run_dir(run_dir)
    recipe = load_recipe(RunPaths(run_dir).recipe)
    what = "full model" if recipe.is_full else "adapter"
    for name in RunPaths.weight_files(recipe.is_full):
        if not (run_dir / name).is_file():
            raise FtkitError(f"{run_dir}: no {name}: the run has no final {what} yet; train first (`ftkit train`)")
    if not RunPaths(run_dir).summary.is_file():
        raise FtkitError(f"{run_dir}: no {RunPaths.SUMMARY}: the run did not finish; train first (`ftkit train`)")
    repo = repo or recipe.hub.repo
    if repo is None and need_repo:
        raise FtkitError("no repo to push to: pass --repo USER/NAME or set `hub.repo` in the recipe")
    if repo is not None and not REPO_ID.fullmatch(repo):
        raise FtkitError(f"repo {repo!r}: expected a hub repo id of the form USER/NAME")
    if recipe.is_random_init and not recipe.is_full and not (RunPaths(run_dir).base / RunPaths.FULL_CONFIG).is_file():
        raise FtkitError(
            f"{run_dir}: a {recipe.model.base}-preset run must hold its base weights in base/; train first"
        )
    evaluation, notes = _canonical_eval(run_dir, recipe, allow_no_eval)
    rl_comparison, rl_notes = _rl_comparison(run_dir)
    return PushPlan(
        run_dir,
        recipe,
        repo,
        recipe.hub.private if private is None else private,
        evaluation,
        full_model=recipe.is_full,
        notes=tuple(notes + rl_notes),
        rl_comparison=rl_comparison,
    )


def _rl_comparison(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """An RL run's rl_eval.json, if it records evaluating the adapter the run holds now (else left out, with a
    note): a file without the hash cannot show which weights its "after" measured."""
    path = RunPaths(run_dir).rl_eval
    if not is_rl_summary(read_json(RunPaths(run_dir).summary)) or not path.is_file():
        return None, []
    comparison = read_json(path)
    made_with = comparison.get("adapter_sha256")
    if made_with is None:
        return None, [f"{path.name} left out: it does not record which {RunPaths.ADAPTER_WEIGHTS} it evaluated"]
    if made_with != rundir.weights_sha256(run_dir, full=False):
        return None, [f"{path.name} left out: it evaluated another {RunPaths.ADAPTER_WEIGHTS} than the run holds now"]
    return comparison, []


def _canonical_eval(run_dir: Path, recipe, allow_no_eval: bool) -> tuple[dict[str, Any] | None, list[str]]:
    from ftkit.evaluation.result_files import canonical_problems

    path = RunPaths(run_dir).eval
    if not path.is_file():
        if allow_no_eval:
            return None, [f"no {RunPaths.EVAL}: the card says the model was not evaluated"]
        raise FtkitError(
            f"{run_dir}: no {RunPaths.EVAL}, the run's own evaluation that push publishes; run "
            f"`ftkit eval {run_dir}` first, or pass --allow-no-eval to push without results"
        )
    problems = canonical_problems(read_json(path), recipe, run_dir)
    if not problems:
        return read_json(path), []
    why = "; ".join(problems)
    if allow_no_eval:
        return None, [f"{RunPaths.EVAL} left out, it is not the run's own evaluation ({why})"]
    raise FtkitError(
        f"{path}: not the run's own evaluation ({why}); rerun `ftkit eval {run_dir}` to evaluate as "
        "the recipe says, or pass --allow-no-eval to push without results"
    )


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FtkitError(f"{path}: not valid JSON") from None
    return data if isinstance(data, dict) else {}
