"""Training losses."""

from __future__ import annotations

import torch
from torch import nn


class InputRelativeLoss(nn.Module):
    """Per-sample loss divided by the input's own error, so every noise level counts alike.

    ``label`` carries two channels: the target and the network's k-pair-mean input channel (see
    :class:`asl_enhance.transforms.AppendInputToLabeld`). Each sample's ``base`` loss (elementwise,
    e.g. Huber) is divided by the mean squared difference between its input and its target. Why: with
    an absolute loss, a high-SNR sample whose blur costs little in absolute terms barely moves the
    weights, so the network learns to blur clean input; relative to the input's error, making a
    clean input worse than it came in is as costly as failing to denoise a noisy one.
    """

    def __init__(self, base: nn.Module | None = None, eps: float = 1e-4):
        super().__init__()
        self.base = base if base is not None else nn.HuberLoss(reduction="none", delta=1.0)
        if getattr(self.base, "reduction", "none") != "none":
            raise ValueError("base loss needs reduction='none' (per-voxel values)")
        self.eps = float(eps)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.shape[1] != 2:
            raise ValueError(f"label needs 2 channels (target, input), got {label.shape[1]}")
        target, source = label[:, :1], label[:, 1:2]
        dims = tuple(range(1, pred.dim()))
        loss = self.base(pred, target).mean(dim=dims)
        input_error = (source - target).pow(2).mean(dim=dims)
        return (loss / (input_error + self.eps)).mean()
