"""`RLTrainer`: a `transformers.Trainer` whose optimizer step is one GRPO update on a buffered round of samples.

Structure as in TRL's GRPOTrainer: a round (prompts_per_step prompts x group_size canvases) is sampled, scored and
buffered, then reused for `num_iterations` optimizer steps; the importance ratio is taken against the policy that
sampled (its likelihoods are computed once, when the round is sampled, under the draws each later step will use).
Unlike TRL, one optimizer step covers the whole round: the kept samples go through forward/backward in micro-batches
of `train.batch_size` canvases, and the Trainer sees one item per step (its own accumulation stays at 1).

Resume: the round of step s is round s // num_iterations, sampled at that round's first step by the policy of that
moment. Checkpoints are only written at round boundaries (`train.save_steps` is a multiple of `num_iterations`), so
a resumed run re-samples its first round with exactly the weights the uninterrupted run sampled it with; every draw
is seeded by (seed, round, ...), so the resumed run reproduces the uninterrupted one.

Checkpoints are atomic through the same component `ftkit train`'s trainer uses (ftkit.run.checkpoint_writer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch
from transformers import Trainer

from ftkit.diffusion.means import row_means
from ftkit.diffusion.token_layout import collate
from ftkit.model.compat import restore_indexed_cpu_locations
from ftkit.recipe import DiffusionSection, RLSection
from ftkit.rl.likelihood import ReferencePolicy, position_losses, sequence_loss
from ftkit.rl.objective import policy_terms, token_policy_terms
from ftkit.rl.rollout import Rollout, Round, derived_seed
from ftkit.run.checkpoint_writer import AtomicCheckpointWriter


class StepItems(torch.utils.data.Dataset):
    """One placeholder item per optimizer step: the samples come from the round buffer, not from the data loader."""

    def __init__(self, steps: int):
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"item": i}


def collate_items(items: list[dict[str, int]]) -> dict[str, torch.Tensor]:
    return {"item": torch.tensor([it["item"] for it in items])}


@dataclass
class Buffered:
    """A round plus the likelihoods fixed when it was sampled, per iteration j: old[j] (the sampling policy; None
    for j = 0, where the current policy is still the sampling one) and ref[j] (None without a KL term)."""

    round: Round
    old: list[torch.Tensor | None]
    ref: list[torch.Tensor | None]
    seconds: float  # sampling + the no-grad likelihoods


class RLTrainer(Trainer):
    model_accepts_loss_kwargs = False

    def __init__(
        self,
        *args,
        rollout: Rollout,
        rl: RLSection,
        reference: ReferencePolicy,
        micro_batch: int,
        pad_id: int,
        diffusion: DiffusionSection,
        **kwargs,
    ):
        restore_indexed_cpu_locations()  # a multi-process CPU resume on transformers 5.17
        super().__init__(*args, **kwargs)
        self.checkpoint_writer = AtomicCheckpointWriter(self)
        self.diffusion = diffusion
        self.rollout = rollout
        self.rl = rl
        self.reference = reference
        self.micro_batch = micro_batch
        self.pad_id = pad_id
        self._buffer: Buffered | None = None
        self._metric_sums: dict[str, tuple[float, int]] = {}
        self.totals = {
            "rounds": 0,
            "samples": 0,
            "sampler_decoder_calls": 0,
            "likelihood_forwards": 0,
            "likelihood_backwards": 0,
            "sampling_seconds": 0.0,
            "likelihood_seconds": 0.0,
        }

    # -- the round buffer
    def _micro_batches(self, indices: list[int]) -> list[list[int]]:
        return [indices[i : i + self.micro_batch] for i in range(0, len(indices), self.micro_batch)]

    def _batch(self, round_: Round, indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        device = self.args.device
        batch = {k: v.to(device) for k, v in collate([round_.samples[i] for i in indices], self.pad_id).items()}
        return batch, round_.chosen[indices].to(device)  # a sample is one block

    def _seeds(self, round_index: int, iteration: int, micro: int) -> list[int]:
        return [
            derived_seed(self.args.seed, "elbo", round_index, iteration, micro, m) for m in range(self.rl.elbo_samples)
        ]

    @property
    def token_credit(self) -> bool:
        return self.rl.credit == "token"

    def _likelihood(self, model, batch, chosen, seeds) -> torch.Tensor:
        """(B,) per-token ELBO losses, or with token credit (B, L) the per-position terms."""
        if self.token_credit:
            return position_losses(model, batch, self.diffusion, seeds)
        return sequence_loss(model, batch, chosen, self.diffusion, seeds)

    def _likelihoods(self, model, round_: Round, iteration: int) -> torch.Tensor:
        """The kept samples' `_likelihood` under iteration `iteration`'s draws (no grad), concatenated."""
        parts = []
        for k, indices in enumerate(self._micro_batches(round_.kept_indices)):
            batch, chosen = self._batch(round_, indices)
            with self.accelerator.autocast():
                parts.append(self._likelihood(model, batch, chosen, self._seeds(round_.index, iteration, k)))
            self.totals["likelihood_forwards"] += len(indices) * self.rl.elbo_samples
        return torch.cat(parts) if parts else torch.zeros(0, device=self.args.device)

    def _start_round(self, model, index: int) -> Buffered:
        started = time.perf_counter()
        model.eval()
        try:
            round_ = self.rollout.sample(model, index)
            sampled = time.perf_counter()
            with torch.no_grad():
                old = [None] + [self._likelihoods(model, round_, j) for j in range(1, self.rl.num_iterations)]
                ref: list[torch.Tensor | None] = [None] * self.rl.num_iterations
                if self.rl.kl_coef > 0:
                    with self.reference.active():
                        ref = [self._likelihoods(model, round_, j) for j in range(self.rl.num_iterations)]
        finally:
            model.train()
        done = time.perf_counter()
        self.totals["rounds"] += 1
        self.totals["samples"] += len(round_.samples)
        self.totals["sampler_decoder_calls"] += round_.decoder_calls
        self.totals["sampling_seconds"] += sampled - started
        self.totals["likelihood_seconds"] += done - sampled
        return Buffered(round_, old, ref, done - started)

    # -- one optimizer step
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        index, iteration = divmod(self.state.global_step, self.rl.num_iterations)
        first_of_round = self._buffer is None or self._buffer.round.index != index
        if first_of_round:
            self._buffer = self._start_round(model, index)
        buf = self._buffer
        round_ = buf.round
        kept = round_.kept_indices
        started = time.perf_counter()
        total = torch.zeros((), device=self.args.device)
        # Device tensors, read back once per optimizer step (not at every micro-batch).
        sums = torch.zeros(4, dtype=torch.float64, device=self.args.device)  # kl, clip_fraction, ratio, elbo_loss
        offset = 0
        for k, indices in enumerate(self._micro_batches(kept)):
            batch, chosen = self._batch(round_, indices)
            span = slice(offset, offset + len(indices))
            offset += len(indices)
            advantages = round_.advantages[indices].to(self.args.device)
            with self.compute_loss_context_manager(), self.accelerator.autocast():
                new = self._likelihood(model, batch, chosen, self._seeds(index, iteration, k))
                old = new.detach() if buf.old[iteration] is None else buf.old[iteration][span]
                ref = buf.ref[iteration][span] if buf.ref[iteration] is not None else None
                if self.token_credit:
                    terms = token_policy_terms(new, old, advantages, chosen, self.rl.clip_eps, self.rl.kl_coef, ref)
                else:
                    terms = policy_terms(new, old, advantages, self.rl.clip_eps, self.rl.kl_coef, ref)
                # Over all N samples of the round, as GRPO averages (a skipped group's advantages are 0): a round
                # where few groups carry signal moves the policy less, instead of amplifying those few samples.
                loss = terms.loss.sum() / len(round_.samples)
            self.accelerator.backward(loss)
            total += loss.detach()
            elbo = row_means(new.detach(), chosen) if self.token_credit else new.detach()
            sums += torch.stack(
                [terms.kl.detach().sum(), terms.clipped.detach().float().sum(), terms.ratio.detach().sum(), elbo.sum()]
            ).double()
            self.totals["likelihood_forwards"] += len(indices) * self.rl.elbo_samples
            self.totals["likelihood_backwards"] += len(indices) * self.rl.elbo_samples
        self.totals["likelihood_seconds"] += time.perf_counter() - started

        metrics = round_.metrics()
        if kept:
            keys = ("kl", "clip_fraction", "ratio", "elbo_loss")
            metrics.update({key: value / len(kept) for key, value in zip(keys, sums.tolist())})
        metrics["step_seconds"] = time.perf_counter() - started + (buf.seconds if first_of_round else 0.0)
        self._record_metrics(metrics)
        return total

    def _record_metrics(self, metrics: dict[str, float]) -> None:
        """Per-key sums and counts: a step without kept samples has no kl/ratio, and must not dilute their means."""
        for key, value in metrics.items():
            total, count = self._metric_sums.get(key, (0.0, 0))
            self._metric_sums[key] = (total + value, count + 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The logging window's mean of every RL metric joins the Trainer's own row (loss, grad_norm, lr)."""
        if "loss" in logs and self._metric_sums:
            for key, (total, count) in self._metric_sums.items():
                logs[key] = round(total / count, 6)
            self._metric_sums = {}
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        self.checkpoint_writer.save(partial(super()._save_checkpoint, model, trial))
