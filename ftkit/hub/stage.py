"""The upload folder of `ftkit push`: the run's shareable files and its model card, staged alike for a dry run
(written to RUN/hub_upload by default) and a real push (a temporary folder uploaded in one commit), so a dry run
shows exactly what would be uploaded."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ftkit.hub.card import model_card
from ftkit.hub.plan import PushPlan
from ftkit.run import rundir
from ftkit.run.paths import RunPaths

RUN_FILES = (RunPaths.RECIPE, RunPaths.SUMMARY, RunPaths.LOSS_PLOT, RunPaths.REWARD_PLOT)  # copied when present


def upload_file_names(plan: PushPlan) -> list[str]:
    """Paths (relative to the run dir) of the run files that go into the upload, README.md excluded."""
    run_dir = plan.run_dir
    names = RunPaths.saved_model_files(run_dir, plan.full_model)
    names += [n for n in RunPaths.tokenizer_files() if (run_dir / n).is_file()]
    names += [n for n in RUN_FILES if (run_dir / n).is_file()]
    if plan.evaluation is not None:
        names.append(RunPaths.EVAL)
    if plan.rl_comparison is not None:
        names.append(RunPaths.RL_EVAL)
    if plan.recipe.is_random_init and not plan.full_model:
        # The random-init base is part of the model: without it the adapter cannot be loaded by anyone.
        names += sorted(f"{RunPaths.BASE}/{p.name}" for p in RunPaths(run_dir).base.iterdir() if p.is_file())
    return names


def stage_upload(plan: PushPlan, folder: Path) -> list[str]:
    """Copy the upload files into `folder` and write the model card; return the relative paths written."""
    names = upload_file_names(plan)
    for name in names:
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan.run_dir / name, dest)
    (folder / "README.md").write_text(model_card(plan), encoding="utf-8")
    return [*names, "README.md"]


def stage_in_place(target: Path, stage) -> str:
    """`stage(folder)` into a temporary folder beside `target`, then moved into place: a dry run that fails leaves
    no half-staged folder, and one that succeeds replaces the previous one whole."""
    with rundir.parents_made_for(target):
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            stage(staging)
            rundir.replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return str(target)
