"""Fidelity measures of an ASL denoiser: planted lesions, their contrast recovery, structure removed and
tissue contrast (issue 17). One place for these facts: the bundle's evaluation overlay
(``evaluate_lesions.json``, :class:`~asl_enhance.transforms.PlantLesionsd`) and the repository's benchmark
(``asl_bench.fidelity``, which documents each measure) both use them.

Lesions are planted into every pair of a long scan so that each pair keeps its own noise exactly: with
gain g(x) (1 outside, ``factor`` inside, a linear ramp one voxel wide at the radius), pair_i' = pair_i +
(g - 1) * mean, so the all-pair mean (the truth) becomes g * mean. CR = (shell - core of the output) /
(shell - core of the truth), summed over the lesions before the ratio; 1 is kept, 0 gone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from monai.utils import optional_import

from . import smoothing

ndimage, HAS_SCIPY = optional_import("scipy.ndimage")  # placing lesions only (evaluation, benchmark)


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class LesionSpec:
    """A planted lesion: perfusion times ``factor`` inside ``radius`` (in-plane voxels, round in mm)."""

    name: str
    factor: float
    radius: float


LESIONS = (LesionSpec("hypo_r5", 0.2, 5.0), LesionSpec("hypo_r2.5", 0.2, 2.5), LesionSpec("hyper_r3.5", 1.8, 3.5))
#: width (voxels) of the linear ramp at the lesion's edge
EDGE = 1.0
#: core = inside this fraction of the radius
CORE_FRACTION = 0.5
#: free voxels between two lesions' shells
GAP = 2.0
#: percentile bands (of the head's lesion-sized local mean of the all-pair mean) where centres may go
HYPO_BAND, HYPER_BAND = (60.0, 98.0), (30.0, 90.0)
#: GM-like / WM-like percentile bands of the all-pair mean inside the head (real scans)
GM_BAND, WM_BAND = (70.0, 95.0), (35.0, 55.0)


def shell_width(radius: float) -> float:
    return max(2.0, 0.5 * radius)


def outer_radius(spec: LesionSpec) -> float:
    return spec.radius + EDGE / 2 + shell_width(spec.radius)


# ------------------------------------------------------------------------------------ lesion planting
def voxel_units(voxel: Sequence[float]) -> np.ndarray:
    """Each axis' voxel size in units of the smallest in-plane voxel (distances round in mm)."""
    voxel = np.asarray(voxel, np.float64)
    return voxel / float(min(voxel[:2]))


def scaled_distance(shape: Sequence[int], centre: Sequence[float], voxel: Sequence[float]) -> np.ndarray:
    """Distance of every voxel from ``centre`` in in-plane voxels (physical, so round in mm)."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    units = voxel_units(voxel)
    return np.sqrt(sum(((g - c) * u) ** 2 for g, c, u in zip(grids, centre, units)))


def sphere_weight(distance: np.ndarray, radius: float, edge: float = EDGE) -> np.ndarray:
    """1 inside ``radius - edge/2``, 0 outside ``radius + edge/2``, linear between (a soft edge)."""
    return np.clip((radius + edge / 2 - distance) / edge, 0.0, 1.0)


def plant_lesions(
    pairs: np.ndarray, lesions: Sequence[tuple[LesionSpec, Sequence[float]]], voxel: Sequence[float]
) -> np.ndarray:
    """Every pair with the lesions planted: pair + (gain - 1) x all-pair mean, so each pair keeps its
    own noise (its difference from the all-pair mean) and the all-pair mean becomes gain x mean."""
    pairs = np.asarray(pairs, np.float32)
    gain = np.ones(pairs.shape[1:], np.float64)
    for spec, centre in lesions:
        gain += (spec.factor - 1.0) * sphere_weight(scaled_distance(gain.shape, centre, voxel), spec.radius)
    mean = pairs.mean(axis=0, dtype=np.float64)
    return (pairs + ((gain - 1.0) * mean)[None]).astype(np.float32)


def lesion_regions(
    shape: Sequence[int], centre: Sequence[float], spec: LesionSpec, voxel: Sequence[float], head: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(core, shell) masks of one planted lesion, inside ``head``."""
    d = scaled_distance(shape, centre, voxel)
    inner = spec.radius + EDGE / 2
    core_mask = (d <= CORE_FRACTION * spec.radius) & head
    shell = (d >= inner) & (d <= inner + shell_width(spec.radius)) & head
    return core_mask, shell


def contrast(image: np.ndarray, core_mask: np.ndarray, shell: np.ndarray) -> float:
    """Shell mean minus core mean."""
    if not core_mask.any() or not shell.any():
        return math.nan
    return float(np.mean(image[shell], dtype=np.float64) - np.mean(image[core_mask], dtype=np.float64))


def contrast_recovery(output: np.ndarray, truth: np.ndarray, regions: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Sum over lesions of the output's contrast over the sum of the truth's (1: kept, 0: gone)."""
    pairs = [(contrast(output, c, s), contrast(truth, c, s)) for c, s in regions]
    pairs = [(o, t) for o, t in pairs if np.isfinite(o) and np.isfinite(t)]
    if not pairs:
        return math.nan
    den = sum(t for _, t in pairs)
    return float(sum(o for o, _ in pairs) / den) if den != 0 else math.nan


def place_lesions(
    mean: np.ndarray,
    head: np.ndarray,
    voxel: Sequence[float],
    specs: Sequence[LesionSpec],
    per_type: int,
    rng: np.random.Generator,
    max_tries: int = 4000,
) -> list[tuple[LesionSpec, tuple[int, ...]]]:
    """Up to ``per_type`` centres for each lesion type, one of each type per round (largest first):
    the lesion and its shell at least one voxel inside the head, shells apart by GAP, hypo- in the
    HYPO_BAND and hyper- in the HYPER_BAND percentiles of the head's lesion-sized local mean of ``mean``."""
    head = np.asarray(head, bool)
    units = voxel_units(voxel)
    padded = np.pad(head, 1)  # outside the field of view is outside the head
    depth = ndimage.distance_transform_edt(padded, sampling=units)[1:-1, 1:-1, 1:-1]
    specs = sorted(specs, key=lambda s: -s.radius)
    candidates = {}
    for spec in specs:
        local = smoothing.gaussian_smooth(mean, tuple(0.5 * spec.radius / u for u in units))
        lo, hi = np.percentile(local[head], HYPO_BAND if spec.factor < 1 else HYPER_BAND)
        found = np.flatnonzero((depth >= outer_radius(spec) + 1.0) & (local >= lo) & (local <= hi) & head)
        rng.shuffle(found)
        candidates[spec] = list(found[:max_tries])
    placed: list[tuple[LesionSpec, tuple[int, ...]]] = []
    for _ in range(per_type):
        for spec in specs:
            while candidates[spec]:
                centre = np.unravel_index(int(candidates[spec].pop()), head.shape)
                if all(
                    np.sqrt(np.sum((np.subtract(centre, c) * units) ** 2)) >= outer_radius(spec) + outer_radius(o) + GAP
                    for o, c in placed
                ):
                    placed.append((spec, tuple(int(v) for v in centre)))
                    break
    return placed


def solid_head(head: np.ndarray) -> np.ndarray:
    """The head mask closed and with its holes filled (a deltaM-only scan's mask, thresholded on
    |deltaM|, is patchy): where lesions are placed and their core and shell measured."""
    pad = 3
    closed = ndimage.binary_closing(np.pad(np.asarray(head, bool), pad), iterations=pad)
    return ndimage.binary_fill_holes(closed)[pad:-pad, pad:-pad, pad:-pad] | head


# --------------------------------------------------------------------------------------- measures
def structure_removed(
    input_mean: np.ndarray,
    output: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    reference_noise_var: np.ndarray | None = None,
) -> float:
    """<input - output, reference> / <reference, reference> inside ``mask``; with the reference's
    noise variance, its energy less that noise (the energy of the infinite-pair mean)."""
    ref = np.asarray(reference, np.float64)[mask]
    removed = (np.asarray(input_mean, np.float64) - np.asarray(output, np.float64))[mask]
    energy = float(np.sum(ref**2))
    if reference_noise_var is not None:
        energy -= float(np.sum(np.asarray(reference_noise_var, np.float64)[mask]))
    return float(np.sum(removed * ref) / energy) if energy > 0 else math.nan


def tissue_ratio(image: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> float:
    """GM median over WM median."""
    if not gm.any() or not wm.any():
        return math.nan
    w = float(np.median(image[wm]))
    return float(np.median(image[gm]) / w) if w != 0 else math.nan


def tissue_ratio_rel(output: np.ndarray, reference: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> float:
    """The output's GM/WM ratio over the reference's (1: tissue contrast kept)."""
    return tissue_ratio(output, gm, wm) / tissue_ratio(reference, gm, wm)


def quantile_masks(mean: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GM-like and WM-like masks of a scan without segmentation: GM_BAND and WM_BAND percentiles of
    its all-pair mean deltaM inside the head."""
    values = np.asarray(mean)[head]
    masks = []
    for band in (GM_BAND, WM_BAND):
        lo, hi = np.percentile(values, band)
        masks.append(head & (mean >= lo) & (mean <= hi))
    return masks[0], masks[1]
