"""Gaussian smoothing of deltaM and the per-scan width choice a careful user could make today:
predict each input pair from the mean of the others, no reference needed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .networks import GaussianSmooth

#: candidate full widths as Gaussian sigma in mm (0 = no smoothing)
SIGMA_CANDIDATES_MM = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def sigma_in_voxels(sigma_mm: float, voxel_sizes: Sequence[float]) -> tuple[float, ...]:
    """Isotropic physical width expressed per axis in voxels."""
    return tuple(float(sigma_mm) / max(float(v), 1e-6) for v in voxel_sizes)


@torch.no_grad()
def gaussian_smooth(volume: np.ndarray, sigma_vox: float | Sequence[float]) -> np.ndarray:
    """Smooth a 3D volume (replicate borders); returns float32."""
    tensor = torch.as_tensor(np.asarray(volume, np.float32))[None, None]
    return GaussianSmooth(3, sigma_vox)(tensor)[0, 0].numpy()


def self_tuned_sigma_mm(
    pairs: np.ndarray,
    voxel_sizes: Sequence[float],
    mask: np.ndarray | None = None,
    candidates_mm: Sequence[float] = SIGMA_CANDIDATES_MM,
) -> float:
    """Width (mm) whose blur of the mean of k-1 pairs best predicts the left-out pair, averaged
    over leave-one-out splits. The held-out pair's own noise adds equally to every candidate, so
    the minimum is the width best for k-1 pairs (slightly wider than best for k). Needs k >= 2."""
    pairs = np.asarray(pairs, np.float32)
    if pairs.shape[0] < 2:
        raise ValueError("a per-scan width needs at least 2 pairs")
    weight = np.ones(pairs.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    total = pairs.sum(axis=0)
    errors = []
    for sigma_mm in candidates_mm:
        sigma = sigma_in_voxels(sigma_mm, voxel_sizes)
        err = 0.0
        for i in range(pairs.shape[0]):
            others = (total - pairs[i]) / (pairs.shape[0] - 1)
            err += float(np.sum((gaussian_smooth(others, sigma) - pairs[i])[weight] ** 2))
        errors.append(err)
    return float(candidates_mm[int(np.argmin(errors))])
