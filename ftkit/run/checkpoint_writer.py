"""Atomic checkpoints for a `transformers.Trainer`: a component both trainers (ftkit.sft.trainer, ftkit.rl.trainer)
hold, so that neither inherits its checkpointing from the other.

A checkpoint is written into `checkpoints/.staging/` first, then renamed into place (atomic on one filesystem),
with a manifest of its files (sizes, sha256) written last: a kill during a save never leaves a half-written
`checkpoint-N`, and `--resume` and `eval --checkpoint` verify what they read (ftkit.run.manifest).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.trainer_utils import rotate_checkpoints

from ftkit.errors import FtkitError
from ftkit.run import manifest
from ftkit.run.paths import RunPaths
from ftkit.run.rundir import replace_dir


class AtomicCheckpointWriter:
    """Saves `trainer`'s checkpoints through a staging folder. The trainer's `_save_checkpoint` hands its
    transformers implementation to `save`:
    `self.checkpoint_writer.save(partial(super()._save_checkpoint, model, trial))`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def save(self, save_checkpoint: Callable[[], None]) -> None:
        """Run `save_checkpoint` (the Trainer's own) into the staging folder, then rename it into place.

        Under several processes every rank writes its part (its RNG state; rank 0 the rest) into the same staging
        folder: rank 0 clears leftovers before anyone writes, and renames only after every rank has written. Both
        points are collectives that also carry each rank's success, so a rank that fails (a full disk) makes all of
        them stop with the previous checkpoint intact instead of leaving the others waiting forever."""
        args = self.trainer.args
        root = Path(args.output_dir)
        staging_root = root / RunPaths.CHECKPOINT_STAGING
        name = f"checkpoint-{self.trainer.state.global_step}"
        if args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # leftovers of a run killed mid-save
        self._everyone_ok(True)  # nobody writes into the staging folder before it is cleared
        original, limit = args.output_dir, args.save_total_limit
        args.output_dir, args.save_total_limit = str(staging_root), None
        failure: BaseException | None = None
        try:
            save_checkpoint()
        except OSError as e:
            failure = e
        finally:
            args.output_dir, args.save_total_limit = original, limit
        if self._everyone_ok(failure is None) and args.should_save:
            try:
                _fsync_tree(staging_root / name)
                manifest.write_manifest(staging_root / name)
                replace_dir(staging_root / name, root / name)
                shutil.rmtree(staging_root, ignore_errors=True)
                rotate_checkpoints(output_dir=original, save_total_limit=limit, use_mtime=False)
            except OSError as e:
                failure = e
        if not self._everyone_ok(failure is None):
            if args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            _raise_failure(failure, root, name)

    def _everyone_ok(self, ok: bool) -> bool:
        """Whether every process reports `ok`; a barrier as well when there are several."""
        args = self.trainer.args
        if args.world_size <= 1:
            return ok
        import torch.distributed as dist

        failed = torch.tensor([0 if ok else 1], device=args.device)
        dist.all_reduce(failed)
        return int(failed.item()) == 0


def _raise_failure(failure: BaseException | None, root: Path, name: str) -> None:
    """The error a failed save stops with: another rank's failure, a full disk (both FtkitError), or the failure."""
    if failure is None:
        raise FtkitError(
            f"{root}: another process failed while writing {name}; the previous checkpoint is intact — rerun with "
            "--resume"
        )
    if isinstance(failure, OSError) and failure.errno in (errno.ENOSPC, errno.EDQUOT):
        raise FtkitError(
            f"{root}: disk full while writing {name}; the previous checkpoint is intact — free some space "
            "and rerun with --resume"
        ) from None
    raise failure


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
