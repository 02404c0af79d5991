"""Rejected alternatives' code (studies/alternatives/README.md): kept so their overlays still run.

Not part of the product: the shipped configs never import this module. Run an overlay with this
folder on the path, e.g. ``PYTHONPATH=studies/alternatives python -m monai.bundle run --config_file
"['asl_bundle/configs/train.json','studies/alternatives/dynunet.json']" --bundle_root asl_bundle ...``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from asl_enhance.layout import InputLayout
from asl_enhance.networks import ScaleMixingEnhancer
from monai.config import KeysCollection
from monai.networks.nets import DynUNet
from monai.transforms import MapTransform
from torch import nn


class PaddedBackbone(nn.Module):
    """Pad the input (replicate) up to a multiple per axis, run the backbone, crop back.

    Backbones that pool (MONAI's BasicUNet, DynUNet) need sizes divisible by their total stride, and
    clinical ASL matrices are not (64x57 in ds000240). ``multiple`` is one int or one per axis, so an
    in-plane-only UNet pads 57 to 64 and leaves 17 slices alone.
    """

    def __init__(self, backbone: nn.Module, multiple: int | Sequence[int] = 1, spatial_dims: int = 3):
        super().__init__()
        self.backbone = backbone
        multiples = list(multiple) if isinstance(multiple, Sequence) else [int(multiple)] * spatial_dims
        if len(multiples) != spatial_dims or min(multiples) < 1:
            raise ValueError(f"multiple needs {spatial_dims} positive values, got {multiple}")
        self.multiples = [int(m) for m in multiples]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = x.shape[2:]
        pad: list[int] = []
        for axis in range(len(self.multiples) - 1, -1, -1):
            pad += [0, (-sizes[axis]) % self.multiples[axis]]
        if max(pad) == 0:
            return self.backbone(x)
        out = self.backbone(F.pad(x, pad, mode="replicate"))
        if out.dim() == 5:
            return out[:, :, : sizes[0], : sizes[1], : sizes[2]]
        return out[:, :, : sizes[0], : sizes[1]]


def in_plane_dynunet(
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = (16, 32, 64, 128),
    norm_name: str = "instance",
) -> PaddedBackbone:
    """MONAI's DynUNet (nnU-Net style) for thick-slice ASL: downsampling in-plane only.

    The first level has a 3x3x3 kernel (one look across slices, like the two-pathway stem), the
    deeper ones 3x3x1 with stride (2, 2, 1), so slices are never pooled. The output convolution
    starts at zero, as for :class:`DilatedTwoPathwayNet`, so an untrained enhancer starts at its base.
    Wrapped in :class:`PaddedBackbone` to accept any in-plane size.
    """
    levels = len(filters)
    net = DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[[3, 3, 3]] + [[3, 3, 1]] * (levels - 1),
        strides=[[1, 1, 1]] + [[2, 2, 1]] * (levels - 1),
        upsample_kernel_size=[[2, 2, 1]] * (levels - 1),
        filters=list(filters),
        norm_name=norm_name,
    )
    for param in net.output_block.parameters():
        nn.init.zeros_(param)
    return PaddedBackbone(net, multiple=(2 ** (levels - 1), 2 ** (levels - 1), 1))


class DynUNetEnhancer(ScaleMixingEnhancer):
    """The shipped head with MONAI's in-plane DynUNet as backbone (the 0.4.0 "dynunet" trial)."""

    def __init__(
        self,
        layout: InputLayout | None = None,
        noise_bound: float = 0.0,
        filters: Sequence[int] = (16, 32, 64, 128),
        **kwargs: Any,
    ):
        super().__init__(layout, noise_bound=noise_bound, **kwargs)
        in_channels = (layout or InputLayout()).num_channels + self.num_scales
        self.backbone = in_plane_dynunet(in_channels, self.num_scales + 1, filters)


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


class AppendInputToLabeld(MapTransform):
    """Append the network input's k-pair-mean channel to ``label`` (2 channels: target, input), for
    :class:`asl_enhance.losses.InputRelativeLoss`; crops and flips then move both alike."""

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = np.concatenate([np.asarray(d[key]), np.asarray(d[self.image_key])[:1]]).astype(np.float32)
        return d
