"""The sequence likelihood proxy of `ftkit rl`, and the reference policy it is compared with.

The proxy is the training objective itself (`ftkit.diffusion.loss.diffusion_loss`: uniform-token corruption at
t ~ U(eps, 1), self-conditioning gate, flat cross-entropy) on a sampled canvas as the clean target, averaged over the
positions the policy chose (not clamped, not forced to a stop by the token masks: `rollout.chosen_positions`) and
over `len(seeds)` corruption draws; the encoder's AR co-loss is left out (it scores
the prompt, not the action). A draw is fully determined by its seed: the current, the sampling and the reference
policy evaluated with the same seeds see the same t, the same corrupted tokens and the same self-conditioning gate
(coupled estimates; independent draws would give the ratio a variance that swamps the signal).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

from ftkit.diffusion.loss import diffusion_loss
from ftkit.diffusion.means import row_means
from ftkit.recipe import DiffusionSection


def position_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    diffusion: DiffusionSection,
    seeds: list[int],
) -> torch.Tensor:
    """(B, L) the canvas cross-entropy at each position, averaged over one corruption draw per seed: the ELBO's
    per-position terms (token-level credit weighs them one by one). Differentiable when grad is enabled; the same
    memory path as training (diffusion.loss_chunk, checkpointing)."""
    cfg = dataclasses.replace(diffusion, encoder_loss_weight=0.0)
    total = None
    for seed in seeds:
        generator = torch.Generator(device=batch["canvas"].device)
        generator.manual_seed(seed)
        tokens = diffusion_loss(model, batch, cfg, generator).token_losses.float()
        total = tokens if total is None else total + tokens
    return total / len(seeds)


def sequence_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    free: torch.Tensor,
    diffusion: DiffusionSection,
    seeds: list[int],
) -> torch.Tensor:
    """(B,) per-token ELBO loss of each canvas in `batch` (`ftkit.diffusion.token_layout.collate` keys): the canvas
    cross-entropy averaged over the positions where `free` (B, L) is true, then over one corruption draw per seed."""
    return row_means(position_losses(model, batch, diffusion, seeds), free)


class ReferencePolicy:
    """The KL anchor, with no second model in memory. Starting from the base, it is the base itself (PEFT's
    `disable_adapter()`: the LoRA path is skipped). Starting from an SFT adapter, it is that adapter frozen: a copy
    of the trainable LoRA tensors taken now, swapped into the parameters (`.data`, no copy) while `active()`.

    The swap rather than a second PEFT adapter: one set of LoRA modules (the 4-bit expert binding and gradient
    checkpointing see nothing new) and the saved adapter stays the single standard `default` adapter."""

    def __init__(self, model: torch.nn.Module, frozen_adapter: bool):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad] if frozen_adapter else []
        self.frozen = [p.detach().clone() for p in self.params]

    @contextmanager
    def active(self):
        """While inside, `model` computes the reference policy. Use under torch.no_grad() with no graph alive."""
        if not self.params:
            with self.model.disable_adapter():
                yield
            return
        current = [p.data for p in self.params]
        for p, frozen in zip(self.params, self.frozen):
            p.data = frozen
        try:
            yield
        finally:
            for p, data in zip(self.params, current):
                p.data = data
