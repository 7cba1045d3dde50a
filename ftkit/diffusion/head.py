"""The LM head as DiffusionGemmaForBlockDiffusion.forward applies it, for code that starts from hidden states."""

from __future__ import annotations

import torch


def head_logits(core: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head + tanh soft-capping, in fp32, exactly as DiffusionGemmaForBlockDiffusion.forward computes logits."""
    cap = core.final_logit_softcapping
    logits = core.lm_head(hidden).float()
    return torch.tanh(logits / cap) * cap
