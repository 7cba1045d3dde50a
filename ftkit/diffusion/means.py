"""The two averages of per-position losses, named by what they average over.

- `mean_over_targets`: one scalar, the mean over every position whose target is not `ignore_index` (the encoder's
  AR co-loss, whose ignored positions hold a loss of 0).
- `row_means`: one value per row, each row's mean over the positions its mask selects (the RL likelihood proxy over
  the positions a policy chose).
"""

from __future__ import annotations

import torch


def mean_over_targets(values: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """() the sum of `values` over the count of targets that are not `ignore_index` (at least 1); `values` must be
    0 where the target is ignored (as cross-entropy with that ignore_index gives)."""
    return values.sum() / (targets != ignore_index).sum().clamp(min=1)


def row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L), (B, L) bool -> (B,) the mean of each row over its true positions (0 for a row with none)."""
    weights = mask.to(values.dtype)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
