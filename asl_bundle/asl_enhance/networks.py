"""Networks: Kim et al.'s two-pathway CNN and a residual wrapper shared by every backbone.

Kim, Choi & Park (Radiology 2018) combine a local pathway of 3x3 convolutions with a global pathway
of dilated convolutions (dilation 2, 4, 8, 16) and predict a residual over the k-pair mean. Kernels
here are in-plane (3x3x1) with one through-plane stem, since clinical ASL slices are thick.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.nets import DynUNet
from torch import nn


def _in_plane(spatial_dims: int, size: int = 3) -> tuple[int, ...]:
    return (size, size) + (1,) * (spatial_dims - 2)


class DilatedTwoPathwayNet(nn.Module):
    """Backbone of Kim et al.: a stem, then local (plain) and global (dilated) pathways, merged.

    Any input size works: no pooling, every convolution keeps the spatial shape. The last layer
    starts at zero so an untrained enhancer returns its residual base unchanged.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        out_channels: int = 1,
        features: int = 24,
        local_layers: int = 4,
        dilations: Sequence[int] = (2, 4, 8, 16),
        through_plane_kernel: int = 3,
        act: str = "PRELU",
        zero_init_output: bool = True,
    ):
        super().__init__()
        stem_kernel = (3, 3) + (through_plane_kernel,) * (spatial_dims - 2)

        def conv(cin: int, cout: int, kernel: Sequence[int], dilation: int = 1, last: bool = False) -> nn.Module:
            dil = (dilation, dilation) + (1,) * (spatial_dims - 2)
            return Convolution(
                spatial_dims,
                cin,
                cout,
                kernel_size=kernel,
                dilation=dil,
                act=None if last else act,
                norm=None,
                conv_only=last,
            )

        self.stem = conv(in_channels, features, stem_kernel)
        plane = _in_plane(spatial_dims)
        self.local_path = nn.Sequential(*[conv(features, features, plane) for _ in range(local_layers)])
        self.global_path = nn.Sequential(*[conv(features, features, plane, d) for d in dilations])
        self.merge = nn.Sequential(
            conv(2 * features, features, (1,) * spatial_dims),
            conv(features, out_channels, _in_plane(spatial_dims), last=True),
        )
        if zero_init_output:  # start as the identity over the residual base: training only adds detail
            last = self.merge[-1]
            for param in last.parameters():
                nn.init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        return self.merge(torch.cat([self.local_path(features), self.global_path(features)], dim=1))


class GaussianSmooth(nn.Module):
    """Fixed separable Gaussian (sigma in voxels per axis; 0 = none on that axis): one 1D
    convolution per axis with replicate padding, so it is cheap even for wide kernels and it scripts
    and exports like any layer."""

    def __init__(self, spatial_dims: int, sigma: float | Sequence[float]):
        super().__init__()
        sigmas = [float(s) for s in (sigma if isinstance(sigma, Sequence) else [sigma] * spatial_dims)]
        if len(sigmas) != spatial_dims or spatial_dims not in (2, 3):
            raise ValueError(f"sigma needs {spatial_dims} values (2D or 3D), got {sigmas}")
        self.spatial_dims = spatial_dims
        taps = [gaussian_1d(torch.tensor(s), truncated=3.0).float() if s > 0 else torch.ones(1) for s in sigmas]
        taps += [torch.ones(1)] * (3 - spatial_dims)
        self.active = [t.numel() > 1 for t in taps]
        self.identity = not any(self.active)
        self.register_buffer("kernel_x", (taps[0] / taps[0].sum()).reshape(1, 1, -1, 1, 1), persistent=False)
        self.register_buffer("kernel_y", (taps[1] / taps[1].sum()).reshape(1, 1, 1, -1, 1), persistent=False)
        self.register_buffer("kernel_z", (taps[2] / taps[2].sum()).reshape(1, 1, 1, 1, -1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        shape = x.shape
        out = x.reshape([shape[0] * shape[1], 1] + list(shape[2:]))
        if self.spatial_dims == 2:
            out = out.unsqueeze(-1)
        if self.active[0]:
            r = self.kernel_x.shape[2] // 2
            out = F.conv3d(F.pad(out, [0, 0, 0, 0, r, r], mode="replicate"), self.kernel_x)
        if self.active[1]:
            r = self.kernel_y.shape[3] // 2
            out = F.conv3d(F.pad(out, [0, 0, r, r, 0, 0], mode="replicate"), self.kernel_y)
        if self.active[2]:
            r = self.kernel_z.shape[4] // 2
            out = F.conv3d(F.pad(out, [r, r, 0, 0, 0, 0], mode="replicate"), self.kernel_z)
        return out.reshape(shape)


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


class ResidualEnhancer(nn.Module):
    """Output = base + backbone(x), base being channel ``residual_channel`` (the k-pair mean),
    optionally pre-smoothed so the backbone starts where a blur is and restores edges and lesions.
    ``pad_multiple`` pads the input (replicate) for backbones that pool, e.g. MONAI's BasicUNet."""

    def __init__(
        self,
        backbone: nn.Module,
        spatial_dims: int = 3,
        residual_channel: int = 0,
        smooth_sigma: float | Sequence[float] = 0.0,
        pad_multiple: int = 1,
    ):
        super().__init__()
        self.backbone = PaddedBackbone(backbone, pad_multiple, spatial_dims) if pad_multiple > 1 else backbone
        self.residual_channel = residual_channel
        self.smooth = GaussianSmooth(spatial_dims, smooth_sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.residual_channel
        base = self.smooth(x[:, c : c + 1])
        return base + self.backbone(x)


class ScaleMixingEnhancer(nn.Module):
    """Output = per-voxel softmax mix of the k-pair mean blurred at several widths (+ a residual).

    The backbone sees the input and the blurred stack and predicts, for every voxel, how much of each
    width to use: wide where the M0 guide is flat, narrow at tissue edges and lesion borders. Weights
    sum to one, so the global level is kept by construction, and at initialisation (zero last layer)
    the output is the average of the stack, already a reasonable blur. A kernel-prediction head on
    Kim et al.'s two-pathway backbone; ``residual`` adds a free correction channel for fine detail.

    ``noise_bound`` > 0 (with ``twin_channel``, the input's noise twin; the next channel is its
    present flag) clips the change to the k-pair mean at ``noise_bound`` local noise standard
    deviations. The local deviation comes from the twin's energy in a Gaussian window
    (``noise_window``, voxels): where the input pairs agree the mean is kept, so a clean or high-SNR
    input is not blurred, and no voxel moves by more than its noise can explain. A hard clip leaves
    every smaller change exactly as the network made it (a tanh limit, tried, shrank them all). Inputs
    without a twin (k = 1) are not bounded. ``noise_feature`` also gives the backbone that local
    deviation as one more channel (its ``in_channels`` counts it), so how much to smooth can follow
    the measured noise level instead of being inferred from texture.
    """

    def __init__(
        self,
        backbone: nn.Module,
        sigmas: Sequence[Sequence[float]],
        spatial_dims: int = 3,
        mean_channel: int = 0,
        residual: bool = True,
        noise_bound: float | None = None,
        twin_channel: int | None = None,
        noise_window: float | Sequence[float] = (2.0, 2.0, 1.0),
        noise_feature: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.smoothers = nn.ModuleList([GaussianSmooth(spatial_dims, s) for s in sigmas])
        self.num_scales = len(sigmas)
        self.mean_channel = mean_channel
        self.residual = residual
        if (noise_bound or noise_feature) and twin_channel is None:
            message = "noise_bound and noise_feature need twin_channel (use_noise_twin); set noise_bound 0 without it"
            raise ValueError(message)
        self.noise_bound = float(noise_bound or 0.0)
        self.noise_feature = bool(noise_feature)
        self.twin_channel = -1 if twin_channel is None else int(twin_channel)
        window = noise_window if isinstance(noise_window, Sequence) else [noise_window] * spatial_dims
        self.noise_window = GaussianSmooth(spatial_dims, list(window)[:spatial_dims])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.mean_channel
        mean = x[:, c : c + 1]
        stack = torch.cat([smooth(mean) for smooth in self.smoothers], dim=1)
        features = [x, stack]
        local_sd = torch.zeros_like(mean)
        if self.noise_feature or self.noise_bound > 0:
            local_sd = self._local_noise_sd(x)
        if self.noise_feature:
            features.append(local_sd)
        out = self.backbone(torch.cat(features, dim=1))
        weights = torch.softmax(out[:, : self.num_scales], dim=1)
        mixed = (weights * stack).sum(dim=1, keepdim=True)
        if self.residual:
            mixed = mixed + out[:, self.num_scales : self.num_scales + 1]
        if self.noise_bound > 0:
            limit = self.noise_bound * local_sd
            bounded = mean + torch.maximum(torch.minimum(mixed - mean, limit), -limit)
            present = x[:, self.twin_channel + 1 : self.twin_channel + 2]
            mixed = torch.where(present > 0.5, bounded, mixed)
        return mixed

    def _local_noise_sd(self, x: torch.Tensor) -> torch.Tensor:
        """Standard deviation of the k-pair mean's noise near each voxel, from its twin's energy."""
        twin = x[:, self.twin_channel : self.twin_channel + 1]
        return torch.sqrt(self.noise_window(twin * twin))
