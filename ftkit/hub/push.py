"""`ftkit push`: a run (or an export) staged with its model card and uploaded in one Hub commit.

- `plan`: what a push of a run would publish, checked first (`plan_push`: the canonical eval.json only).
- `card`: the model card (huggingface_hub's `ModelCard` / `ModelCardData`).
- `stage`: the upload folder, the same for `--dry-run` (written to RUN/hub_upload by default) and a real push (a
  temporary folder), so a dry run shows exactly what would be uploaded.
- `upload`: one `create_commit`; the token is never printed: every message built from a hub error is scrubbed of it.
- `access`: fail fast when the Hub cannot be reached (for loading, not pushing).

An export (`ftkit export RUN OUT`) is pushed as written: its merged model, its card and the eval it was measured
with (`push_export`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.hub.plan import PLACEHOLDER_REPO, REPO_ID, plan_push, read_json
from ftkit.hub.stage import stage_in_place, stage_upload
from ftkit.hub.upload import find_token, upload_folder
from ftkit.run.lock import holds_run_lock
from ftkit.run.paths import RunPaths


@holds_run_lock("push")
def push_run(
    run_dir,
    repo: str | None = None,
    private: bool | None = None,
    dry_run: bool = False,
    dry_run_dir=None,
    endpoint: str | None = None,
    token: str | None = None,
    allow_no_eval: bool = False,
    on_note=None,
) -> str:
    """Upload the run (adapter, tokenizer, recipe, canonical eval, summary, loss plot, model card) in one commit and
    return the repo URL; with `dry_run`, write the upload folder locally and return its path instead. A run without
    a canonical eval.json is refused unless `allow_no_eval`; `on_note(text)` hears what was left out."""
    plan = plan_push(Path(run_dir), repo, private, need_repo=not dry_run, allow_no_eval=allow_no_eval)
    for note in plan.notes:
        if on_note is not None:
            on_note(note)
    if dry_run:
        target = Path(dry_run_dir) if dry_run_dir is not None else RunPaths(plan.run_dir).hub_upload
        return stage_in_place(target, lambda into: stage_upload(plan, into))

    token = token or find_token()
    with tempfile.TemporaryDirectory(prefix="ftkit-push-") as tmp:
        folder = Path(tmp)
        stage_upload(plan, folder)
        message = f"ftkit: {plan.recipe.task.name} LoRA adapter"
        return upload_folder(folder, plan.repo, plan.private, message, endpoint, token)


def is_export_dir(path: Path) -> bool:
    from ftkit.export import EXPORT_MANIFEST

    return (Path(path) / EXPORT_MANIFEST).is_file()


def push_export(
    folder,
    repo: str | None = None,
    private: bool | None = None,
    dry_run: bool = False,
    dry_run_dir=None,
    endpoint: str | None = None,
    token: str | None = None,
    allow_no_eval: bool = False,
) -> str:
    """Upload an export folder's own files (those its ftkit_export.json lists) in one commit; the card's
    placeholder repo id becomes the real one. Refused without the run's evaluation unless `allow_no_eval`."""
    from ftkit.export import EXPORT_MANIFEST
    from ftkit.run import filecheck

    folder = Path(folder)
    manifest = read_json(folder / EXPORT_MANIFEST)
    names = manifest.get("files")
    if not isinstance(names, list) or not names:
        raise FtkitError(f"{folder / EXPORT_MANIFEST}: lists no files; export again (`ftkit export RUN OUT`)")
    for name in names:
        what = filecheck.problem(folder / name)
        if what:
            raise FtkitError(f"{folder / name}: {what}; export again (`ftkit export RUN OUT`)")
    if manifest.get("eval") is None and not allow_no_eval:
        raise FtkitError(
            f"{folder}: the export holds no evaluation (eval.json): run `ftkit eval RUN`, export again, "
            "or pass --allow-no-eval to push without results"
        )
    if repo is None and not dry_run:
        raise FtkitError("no repo to push an export to: pass --repo USER/NAME")
    if repo is not None and not REPO_ID.fullmatch(repo):
        raise FtkitError(f"repo {repo!r}: expected a hub repo id of the form USER/NAME")

    def stage(into: Path) -> None:
        for name in names:
            shutil.copyfile(folder / name, into / name)
        card = into / "README.md"
        if card.is_file():
            card.write_text(
                card.read_text(encoding="utf-8").replace("PATH_OR_REPO", repo or PLACEHOLDER_REPO), encoding="utf-8"
            )

    if dry_run:
        default = folder.parent / f"{folder.name}-{RunPaths.HUB_UPLOAD}"
        target = Path(dry_run_dir) if dry_run_dir is not None else default
        return stage_in_place(target, stage)
    token = token or find_token()
    with tempfile.TemporaryDirectory(prefix="ftkit-push-") as tmp:
        stage(Path(tmp))
        message = f"ftkit: {manifest.get('task', 'DiffusionGemma')} model (merged export, {manifest.get('form')})"
        return upload_folder(Path(tmp), repo, bool(private), message, endpoint, token)
