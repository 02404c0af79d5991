"""Classical deltaM denoisers for the benchmark (scripts/benchmark.py), each with its parameter grid.

Every denoiser maps a 3D volume in normalised units (deltaM in percent of the guide's level, as the
network sees it) and the guide at unit level to a volume of the same shape. Slice-wise methods treat
the last axis as slices (clinical ASL slices are thick). Parameters are tuned per k on a simulated
validation split by :func:`tune`, which picks the grid point of lowest geometric-mean NMSE against the
truth (a geometric mean, so one series with a corrupted pair does not decide for all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from asl_enhance.metrics import nmse
from asl_enhance.smoothing import gaussian_smooth
from scipy import ndimage

Params = dict[str, Any]
Denoiser = Callable[[np.ndarray, np.ndarray, Params], np.ndarray]

#: Gaussian sigma grid in voxels: in-plane (x and y) and through-plane (z)
GAUSS_INPLANE = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.5)
GAUSS_THROUGH = (0.0, 0.5, 1.0, 1.5, 2.0)
#: BM3D speed profile: step 5 and search window 15 instead of 3 and 39 (about 5x faster on 2 cores)
BM3D_STEP, BM3D_SEARCH = 5, 15
#: pixels of reflection padding around each slice in the BM3D mosaic (one 8x8 block)
MOSAIC_PAD = 8


def noise_std(volume: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Robust noise std from in-plane neighbour differences (MAD / sqrt 2) inside ``mask``.

    Spatially correlated noise reads low (by sqrt(1 - rho)); the grids are multiples of this value.
    """
    diff = np.diff(np.asarray(volume, np.float64), axis=0)
    if mask is not None:
        diff = diff[np.asarray(mask, bool)[1:] & np.asarray(mask, bool)[:-1]]
    diff = diff.ravel()
    if diff.size == 0:
        return 1.0
    mad = float(np.median(np.abs(diff - np.median(diff))))
    return max(1.4826 * mad / np.sqrt(2.0), 1e-6)


# ----------------------------------------------------------------------------------------- Gaussian
def gaussian(volume: np.ndarray, guide: np.ndarray, params: Params) -> np.ndarray:
    """Gaussian blur, sigma (voxels) ``inplane`` on x and y, ``through`` on z."""
    s = float(params["inplane"]), float(params["through"])
    return gaussian_smooth(volume, (s[0], s[0], s[1]))


def gaussian_grid(inplane: Sequence[float] = GAUSS_INPLANE, through: Sequence[float] = GAUSS_THROUGH) -> list[Params]:
    return [{"inplane": a, "through": b} for a in inplane for b in through]


# ----------------------------------------------------------------------------------- guided filter
def _box(x: np.ndarray, radius: int) -> np.ndarray:
    size = (2 * radius + 1, 2 * radius + 1) + (1,) * (x.ndim - 2)
    return ndimage.uniform_filter(x, size=size, mode="reflect")


def guided_filter(p: np.ndarray, guide: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter, slice-wise: q = mean(a) * I + mean(b) with a locally linear model
    a = cov(I, p) / (var(I) + eps), b = mean(p) - a mean(I) in (2r+1)^2 windows."""
    p = np.asarray(p, np.float64)
    guide = np.asarray(guide, np.float64)
    mean_i, mean_p = _box(guide, radius), _box(p, radius)
    cov_ip = _box(guide * p, radius) - mean_i * mean_p
    var_i = _box(guide * guide, radius) - mean_i**2
    a = cov_ip / (np.maximum(var_i, 0.0) + eps)
    b = mean_p - a * mean_i
    return (_box(a, radius) * guide + _box(b, radius)).astype(np.float32)


def guided(volume: np.ndarray, guide: np.ndarray, params: Params) -> np.ndarray:
    """M0-guided filter (guide at unit level, ``eps`` in its squared units)."""
    return guided_filter(volume, guide, int(params["radius"]), float(params["eps"]))


def guided_grid() -> list[Params]:
    return [{"radius": r, "eps": e} for r in (1, 2, 3, 4, 6) for e in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)]


# ------------------------------------------------------------------------ multi-guide local regression
def local_regression(
    volume: np.ndarray, regressors: Sequence[np.ndarray], sigma_vox: Sequence[float], ridge: float = 1e-3
) -> np.ndarray:
    """Gaussian-weighted local least squares: volume ~ sum_i c_i(x) r_i(x), with coefficient fields
    c_i smooth at ``sigma_vox`` (scipy's Gaussian, replicated borders), returned as sum_i c_i r_i.

    One constant regressor gives the Gaussian blur; tissue maps (GM, WM, CSF) keep every
    partial-volume edge of those maps and smooth only the per-tissue levels. ``ridge`` (times the
    local mean diagonal) keeps the per-voxel systems solvable where a regressor is absent."""
    y = np.asarray(volume, np.float64)
    regs = [np.asarray(r, np.float64) for r in regressors]
    n = len(regs)
    gram = np.empty((*y.shape, n, n))
    rhs = np.empty((*y.shape, n))
    for i in range(n):
        rhs[..., i] = ndimage.gaussian_filter(regs[i] * y, sigma_vox, mode="nearest")
        for j in range(i, n):
            gram[..., i, j] = gram[..., j, i] = ndimage.gaussian_filter(regs[i] * regs[j], sigma_vox, mode="nearest")
    scale = np.trace(gram, axis1=-2, axis2=-1)[..., None, None] / n
    gram += (ridge * scale + 1e-12) * np.eye(n)
    coefficients = np.linalg.solve(gram, rhs[..., None])[..., 0]
    return np.einsum("...i,i...->...", coefficients, np.stack(regs)).astype(np.float32)


# ---------------------------------------------------------------------------------- non-local means
def nlm(volume: np.ndarray, guide: np.ndarray, params: Params) -> np.ndarray:
    """scikit-image non-local means per slice, h = ``h`` x the estimated noise std (fast mode)."""
    from skimage.restoration import denoise_nl_means

    sigma = noise_std(volume, guide > 0.2)
    out = np.empty_like(volume, dtype=np.float32)
    for z in range(volume.shape[-1]):
        out[..., z] = denoise_nl_means(
            volume[..., z].astype(np.float64),
            h=float(params["h"]) * sigma,
            sigma=sigma,
            patch_size=int(params["patch_size"]),
            patch_distance=int(params["patch_distance"]),
            fast_mode=True,
        )
    return out


def nlm_grid() -> list[Params]:
    return [
        {"h": h, "patch_size": ps, "patch_distance": pd} for h in (1.5, 2.2, 3.2, 4.5) for ps, pd in ((3, 4), (5, 6))
    ]


# -------------------------------------------------------------------------------------------- BM3D
def _mosaic(volume: np.ndarray, pad: int) -> np.ndarray:
    padded = np.pad(volume, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return np.concatenate([padded[..., z] for z in range(volume.shape[-1])], axis=1)


def _unmosaic(image: np.ndarray, shape: tuple[int, ...], pad: int) -> np.ndarray:
    width = shape[1] + 2 * pad
    slices = [image[pad:-pad, z * width + pad : (z + 1) * width - pad] for z in range(shape[2])]
    return np.stack(slices, axis=-1)


def bm3d_denoise(volume: np.ndarray, guide: np.ndarray, params: Params) -> np.ndarray:
    """BM3D (``bm3d`` package) on a mosaic of the slices, so the library's fixed start-up cost is paid
    once per volume and blocks match across slices; sigma_psd = ``sigma`` x the estimated noise std."""
    import bm3d

    profile = bm3d.BM3DProfile()
    profile.step_ht = profile.step_wiener = BM3D_STEP
    profile.search_window_ht = profile.search_window_wiener = BM3D_SEARCH
    sigma = float(params["sigma"]) * noise_std(volume, guide > 0.2)
    pad = min(MOSAIC_PAD, volume.shape[0] - 1, volume.shape[1] - 1)
    image = _mosaic(np.asarray(volume, np.float64), pad)
    out = np.asarray(bm3d.bm3d(image, sigma_psd=sigma, profile=profile), np.float32)
    return _unmosaic(out, volume.shape, pad)


def bm3d_grid() -> list[Params]:
    return [{"sigma": s} for s in (1.0, 1.4, 2.0, 2.8, 4.0)]


#: name -> (denoiser, grid, slow); slow ones are tuned on a slab of central slices
DENOISERS: dict[str, tuple[Denoiser, Callable[[], list[Params]], bool]] = {
    "gaussian": (gaussian, gaussian_grid, False),
    "nlm": (nlm, nlm_grid, True),
    "bm3d": (bm3d_denoise, bm3d_grid, True),
    "guided": (guided, guided_grid, False),
}


def tune(
    denoiser: Denoiser,
    grid: Sequence[Params],
    cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[Params, list[float]]:
    """Grid point of lowest geometric-mean NMSE over ``cases`` of (input, guide, truth, mask); all scores."""
    scores = []
    for params in grid:
        scores.append(geometric_mean([nmse(denoiser(x, g, params), t, m) for x, g, t, m in cases]))
    return dict(grid[int(np.argmin(scores))]), scores


def tune_gaussian(
    cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    inplane: Sequence[float] = GAUSS_INPLANE,
    through: Sequence[float] = GAUSS_THROUGH,
) -> tuple[Params, list[float]]:
    """:func:`tune` for the Gaussian grid, reusing each in-plane blur for every through-plane width."""
    grid = gaussian_grid(inplane, through)
    errors = np.zeros((len(cases), len(grid)))
    for c, (x, _, truth, mask) in enumerate(cases):
        j = 0
        for a in inplane:
            planar = gaussian_smooth(x, (a, a, 0.0))
            for b in through:
                errors[c, j] = nmse(gaussian_smooth(planar, (0.0, 0.0, b)), truth, mask)
                j += 1
    scores = [geometric_mean(errors[:, j]) for j in range(len(grid))]
    return dict(grid[int(np.argmin(scores))]), scores


def geometric_mean(values: Sequence[float]) -> float:
    """exp(mean(log)) of positive errors (floored at 1e-12)."""
    return float(np.exp(np.mean(np.log(np.maximum(np.asarray(values, np.float64), 1e-12)))))
