"""`transformers.Trainer` with DiffusionGemma's diffusion loss.

`compute_loss` calls `ftkit.diffusion.loss.diffusion_loss`; the loss is a per-micro-batch mean, and
`model_accepts_loss_kwargs = False` makes the Trainer divide by the accumulation steps itself, so gradient
accumulation matches a large batch. Noise is drawn from a generator seeded by (seed, optimizer step, micro-batch,
process): a resumed run draws exactly the noise an uninterrupted one would. Checkpoints are atomic
(ftkit.run.checkpoint_writer).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer

from ftkit.diffusion.loss import diffusion_loss
from ftkit.model.compat import restore_indexed_cpu_locations
from ftkit.recipe import DiffusionSection
from ftkit.run.checkpoint_writer import AtomicCheckpointWriter

BATCH_KEYS = ("input_ids", "attention_mask", "prompt_len", "canvas", "fixed")
LOSS_PARTS = ("diffusion_loss", "encoder_loss", "noise_level", "self_conditioned")  # logged beside `loss`


class DiffusionTrainer(Trainer):
    model_accepts_loss_kwargs = False

    def __init__(self, *args, diffusion: DiffusionSection, noise_log: Path | None = None, **kwargs):
        restore_indexed_cpu_locations()  # a multi-process CPU resume on transformers 5.17
        super().__init__(*args, **kwargs)
        self.checkpoint_writer = AtomicCheckpointWriter(self)
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
        self.checkpoint_writer.save(partial(super()._save_checkpoint, model, trial))
