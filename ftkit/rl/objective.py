"""The RL objective as pure tensor functions (no model, no sampling), so each can be checked by hand.

A sample y of prompt x is one whole canvas (ESPO's sequence-level view: the generation is one action). Its likelihood
proxy is the diffusion loss training already minimizes, taken as the clean target y under fresh corruption draws and
averaged over the free canvas positions: l(y) = -ELBO(y) / |free|, in nats per token (`likelihood.py`). So

    log ratio = l_old(y) - l_theta(y)            (per-token normalized: the length no longer scales the exponent)
    ratio     = exp(log ratio)
    loss(y)   = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * (l_theta(y) - l_ref(y))^2 / 2

with A the group-normalized advantage; a step minimizes the sum of loss(y) over the round's kept samples divided by
all N samples of the round (GRPO's mean, skipped groups contributing 0). The KL term is Schulman's k2 estimator on the
per-token log-likelihood difference to the reference policy (ESPO uses k2 too: k3's exp() of a sequence-level
difference explodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A group whose reward spread is below this has no signal: every advantage would be ~0 (or noise over ~0).
FLAT_GROUP_STD = 1e-6
# Added to the group std before dividing (TRL's GRPO uses the same constant).
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, G) rewards -> ((P, G) advantages (r - group mean) / (group std + STD_EPS), (P,) kept).

    The std is the sample std (Bessel-corrected), as TRL's GRPOTrainer takes it. A group whose rewards are all equal
    is not kept: its advantages are 0 and it is left out of the loss entirely."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    kept = std.squeeze(1) > FLAT_GROUP_STD
    advantages = torch.where(kept[:, None], (rewards - mean) / (std + STD_EPS), torch.zeros_like(rewards))
    return advantages, kept


def position_advantages(
    clean: torch.Tensor, success: torch.Tensor, chosen: torch.Tensor, satisfied_weight: float, success_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level credit (`rl.credit: token`). clean: (P, G, L) 1 where the verifier flags nothing at the position,
    success: (P, G), chosen: (P, L) -> ((P, G, L) advantages, (P,) kept).

    A position's reward is satisfied_weight * clean + success_weight * success; its advantage is that minus the mean
    over the group at the same position (same prompt, same place), 0 where the policy did not choose. Not divided by
    the std (Dr. GRPO): a position where one sample of eight went wrong would otherwise get a full-size update from
    one flip. A position where the whole group agrees carries no signal; a group with none anywhere is not kept."""
    reward = satisfied_weight * clean + success_weight * success[:, :, None]
    advantages = (reward - reward.mean(dim=1, keepdim=True)) * chosen[:, None, :].to(reward.dtype)
    kept = advantages.abs().flatten(1).amax(dim=1) > FLAT_GROUP_STD
    return advantages, kept


def scale_negatives(advantages: torch.Tensor, weight: float) -> torch.Tensor:
    """Below-average samples (or positions) pushed down `weight` times as hard as above-average ones are pulled up
    (`rl.negative_weight`): 1 is GRPO; 0 only reinforces the better samples (filtered self-training, as RAFT and
    ReST). Pulling a sample's tokens up sharpens a softmax; pushing them down spreads their mass over every other
    token, without bound."""
    return torch.where(advantages < 0, advantages * weight, advantages)


@dataclass
class PolicyTerms:
    loss: torch.Tensor  # (B,) what is minimized per sample: clipped surrogate + kl_coef * kl (with gradient)
    ratio: torch.Tensor  # (B,) importance ratio against the sampling policy (detached)
    # (B,) fraction of the sample's chosen positions where the clip is active, so the surrogate passes no gradient
    # there (0 or 1 for sequence credit: one position)
    clipped: torch.Tensor
    kl: torch.Tensor  # (B,) k2 estimate of the per-token KL to the reference (detached; 0 without a reference)


def policy_terms(
    loss_new: torch.Tensor,
    loss_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    kl_coef: float = 0.0,
    loss_ref: torch.Tensor | None = None,
) -> PolicyTerms:
    """Per-sample objective from per-token ELBO losses (B,) of the current policy (with gradient), the sampling
    policy and the reference, all under the same corruption draws. See the module docstring for the formula.
    The sequence is the token-level objective's one-position case: the whole sample is one action."""
    one = torch.ones_like(loss_new[:, None], dtype=torch.bool)
    ref = None if loss_ref is None else loss_ref[:, None]
    return token_policy_terms(loss_new[:, None], loss_old[:, None], advantages[:, None], one, clip_eps, kl_coef, ref)


def token_policy_terms(
    loss_new: torch.Tensor,
    loss_old: torch.Tensor,
    advantages: torch.Tensor,
    chosen: torch.Tensor,
    clip_eps: float,
    kl_coef: float = 0.0,
    loss_ref: torch.Tensor | None = None,
) -> PolicyTerms:
    """The objective with token-level credit: (B, L) per-position ELBO losses (the cross-entropy at each position,
    averaged over the draws) and (B, L) advantages; `policy_terms` is its one-position case. The ratio and the clip
    are per position (diffu-GRPO's token level, with the ELBO's per-position term as the log-likelihood), the
    surrogate is averaged over the chosen positions; the KL is the k2 of the per-token sequence likelihoods."""
    weights = chosen.to(loss_new.dtype)
    count = weights.sum(dim=1).clamp(min=1)
    ratio = torch.exp(loss_old - loss_new)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = (-torch.min(ratio * advantages, clipped_ratio * advantages) * weights).sum(dim=1) / count
    if loss_ref is None:
        kl = torch.zeros_like(count)
    else:
        kl = 0.5 * (((loss_new - loss_ref) * weights).sum(dim=1) / count) ** 2
    clipped = ((ratio > 1.0 + clip_eps) & (advantages > 0)) | ((ratio < 1.0 - clip_eps) & (advantages < 0))
    return PolicyTerms(
        loss=surrogate + kl_coef * kl,
        ratio=((ratio * weights).sum(dim=1) / count).detach(),
        clipped=((clipped & chosen).to(weights.dtype).sum(dim=1) / count).detach(),
        kl=kl.detach(),
    )


def sample_entropy(canvases: torch.Tensor, free: torch.Tensor) -> float:
    """How diverse a round's samples are: per group and free position, the entropy (nats) of the empirical token
    distribution over the group's G canvases, averaged. 0 = every sample of a group identical (collapse); at most
    log G. canvases: (P, G, L) token ids; free: (P, L) bool."""
    group = canvases.shape[1]
    same = (canvases[:, :, None, :] == canvases[:, None, :, :]).sum(dim=2).float()  # (P, G, L): copies of my token
    entropy = torch.log(torch.tensor(float(group))) - torch.log(same).mean(dim=1)  # (P, L)
    weights = free.float()
    return float((entropy * weights).sum() / weights.sum().clamp(min=1))
