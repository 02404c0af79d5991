"""A training loss that values edges as well as values (issue 17 candidate; study only).

``EdgeHuberLoss`` = Huber(prediction, target) + weight x the mean Huber of their forward differences
along each spatial axis. A blur lowers the value term's noise but flattens the differences the truth
has at lesion borders and at the grey/white boundary, so the second term charges for what a blur takes.
"""

from __future__ import annotations

import torch


class EdgeHuberLoss(torch.nn.Module):
    """Huber on values plus ``weight`` x Huber on first differences along the spatial axes of (B, C, ...)."""

    def __init__(self, weight: float = 1.0, delta: float = 1.0):
        super().__init__()
        self.weight = float(weight)
        self.huber = torch.nn.HuberLoss(delta=delta)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.huber(prediction, target)
        if self.weight == 0:
            return loss
        axes = range(2, prediction.ndim)
        edges = [self.huber(torch.diff(prediction, dim=a), torch.diff(target, dim=a)) for a in axes]
        return loss + self.weight * torch.stack(edges).mean()
