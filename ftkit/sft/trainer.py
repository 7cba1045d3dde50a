"""`transformers.Trainer` with DiffusionGemma's diffusion loss.

`compute_loss` calls `ftkit.diffusion.loss.diffusion_loss`; the loss is a per-micro-batch mean, and
`model_accepts_loss_kwargs = False` makes the Trainer divide by the accumulation steps itself, so gradient
accumulation matches a large batch. Noise is drawn from a generator seeded by (seed, optimizer step, micro-batch,
process): a resumed run draws exactly the noise an uninterrupted one would. Checkpoints are written to a staging
directory and renamed into place, so a kill during a save never leaves a half-written `checkpoint-N`; each carries a
manifest (ftkit.run.manifest) that `--resume` and `eval --checkpoint` verify.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from ftkit.diffusion.loss import diffusion_loss
from ftkit.errors import FtkitError
from ftkit.model.compat import restore_indexed_cpu_locations
from ftkit.recipe import DiffusionSection
from ftkit.run import manifest
from ftkit.run.rundir import replace_dir

BATCH_KEYS = ("input_ids", "attention_mask", "prompt_len", "canvas", "fixed")
LOSS_PARTS = ("diffusion_loss", "encoder_loss", "noise_level", "self_conditioned")  # logged beside `loss`
STAGING = ".staging"


class DiffusionTrainer(Trainer):
    model_accepts_loss_kwargs = False

    def __init__(self, *args, diffusion: DiffusionSection, noise_log: Path | None = None, **kwargs):
        restore_indexed_cpu_locations()  # a multi-process CPU resume on transformers 5.17
        super().__init__(*args, **kwargs)
        self.diffusion = diffusion
        self.noise_log = noise_log
        self._micro = 0
        self._micro_step = -1
        self._sums: torch.Tensor | None = None  # LOSS_PARTS summed over micro-batches since the last log
        self._count = 0
        self._noise_rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        step = self.state.global_step
        if step != self._micro_step:
            self._micro_step, self._micro = step, 0
        seed = ((self.args.seed * 1_000_003 + step) * 1_009 + self._micro) * 131 + self.args.process_index
        self._micro += 1
        gen = torch.Generator(device=device)
        gen.manual_seed(seed % (2**63))
        return gen

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: inputs[k] for k in BATCH_KEYS if k in inputs}
        # accelerate applies mixed precision by wrapping the model's forward; the lean loss path calls the encoder,
        # decoder and head directly, so the same autocast is entered here (a no-op without mixed precision, and
        # harmless around the reference path's already-autocast forward).
        with self.accelerator.autocast():
            out = diffusion_loss(model, batch, self.diffusion, self._noise_generator(batch["canvas"].device))
        if model.training:
            self._record(out)
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

    def _record(self, out) -> None:
        # Device tensors only: a float() or tolist() here would wait for the GPU at every micro-batch. They are read
        # back once per logging step, where the Trainer reads the loss too.
        parts = torch.stack(
            [
                torch.as_tensor(v).detach().float().to(out.diffusion.device)
                for v in (out.diffusion, out.encoder, out.t_mean, out.self_conditioned)
            ]
        )
        self._sums = parts if self._sums is None else self._sums + parts
        self._count += 1
        if self.noise_log is not None and self.is_world_process_zero():
            self._noise_rows.append((self.state.global_step, out.t.detach(), out.per_example.detach()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # every process logs the training loss at the same step (the Trainer gathers it there)
            logs.update(self._loss_parts_over_processes())
            self._sums, self._count = None, 0
            self._flush_noise_rows()
        super().log(logs, start_time)

    def _loss_parts_over_processes(self) -> dict[str, float]:
        """The loss parts' means over every process's micro-batches since the last log, as the Trainer averages
        `loss` itself; under DDP each process saw its own batches, so rank 0's alone would not match the total."""
        sums = self._sums if self._sums is not None else torch.zeros(len(LOSS_PARTS))
        local = torch.cat(
            [
                sums.double().to(self.args.device),
                torch.tensor([self._count], dtype=torch.float64, device=self.args.device),
            ]
        )
        *totals, count = self.accelerator.reduce(local, reduction="sum").tolist()
        return {k: round(total / count, 6) for k, total in zip(LOSS_PARTS, totals)} if count else {}

    def _flush_noise_rows(self) -> None:
        if self._noise_rows and self.noise_log is not None:
            lines = [
                json.dumps({"step": step, "t": round(t, 5), "loss": round(loss, 5)})
                for step, ts, losses in self._noise_rows
                for t, loss in zip(ts.tolist(), losses.tolist())
            ]
            with self.noise_log.open("a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            self._noise_rows = []

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into `.staging/` first, then rename it into place (atomic on one filesystem), with a
        manifest of its files (sizes, sha256) written last.

        Under several processes every rank writes its part (its RNG state; rank 0 the rest) into the same staging
        folder: rank 0 clears leftovers before anyone writes, and renames only after every rank has written. Both
        points are collectives that also carry each rank's success, so a rank that fails (a full disk) makes all of
        them stop with the previous checkpoint intact instead of leaving the others waiting forever."""
        root = Path(self.args.output_dir)
        staging_root = root / STAGING
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # leftovers of a run killed mid-save
        self._everyone_ok(True)  # nobody writes into the staging folder before it is cleared
        original, limit = self.args.output_dir, self.args.save_total_limit
        self.args.output_dir, self.args.save_total_limit = str(staging_root), None
        failure: BaseException | None = None
        try:
            super()._save_checkpoint(model, trial)
        except OSError as e:
            failure = e
        finally:
            self.args.output_dir, self.args.save_total_limit = original, limit
        if self._everyone_ok(failure is None) and self.args.should_save:
            try:
                _fsync_tree(staging_root / name)
                manifest.write_manifest(staging_root / name)
                replace_dir(staging_root / name, root / name)
                shutil.rmtree(staging_root, ignore_errors=True)
                rotate_checkpoints(output_dir=original, save_total_limit=limit, use_mtime=False)
            except OSError as e:
                failure = e
        if not self._everyone_ok(failure is None):
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            if failure is None:
                raise FtkitError(
                    f"{root}: another process failed while writing {name}; the previous checkpoint is "
                    "intact — rerun with --resume"
                )
            if isinstance(failure, OSError) and failure.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FtkitError(
                    f"{root}: disk full while writing {name}; the previous checkpoint is intact — free some space "
                    "and rerun with --resume"
                ) from None
            raise failure

    def _everyone_ok(self, ok: bool) -> bool:
        """Whether every process reports `ok`; a barrier as well when there are several."""
        if self.args.world_size <= 1:
            return ok
        import torch.distributed as dist

        failed = torch.tensor([0 if ok else 1], device=self.args.device)
        dist.all_reduce(failed)
        return int(failed.item()) == 0


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


class JsonlLogCallback(TrainerCallback):
    """Appends every log dict (with its step) to train_log.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class LogLineCallback(TrainerCallback):
    """One plain line per log for output that is not a terminal (a file, a pipe, CI), e.g.
    `step 10/300  loss 3.091  diffusion_loss 2.874  learning_rate 0.0015`: the Trainer's own printer writes bare
    dicts without the step."""

    def __init__(self, stream=None):
        self.stream = stream

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, value in logs.items():
            if key == "total_flos" or not isinstance(value, (int, float)):
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        print("  ".join(parts), file=self.stream or sys.stderr, flush=True)
