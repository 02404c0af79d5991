"""Scores of an enhanced deltaM: MONAI metrics for training validation, and the noise-corrected
error and effective number of pairs for evaluation without clean data.

With N pairs, an estimate from k pairs is scored against the mean of the other N-k. That reference's
own noise adds its variance (the pairs' spread / (N-k)) to every method's squared error equally, so
subtracting it estimates the error against the infinite-pair mean.

The *effective number of pairs* of a method is the n whose plain n-pair mean, on the same scan, has
the same error. It is read off a measured curve (:func:`mean_error_curve`): the n-pair mean's corrected
error for n = 1, 2, 4, 8, ..., each the median over all disjoint n-pair groups scored against the
other pairs, i.e. the same statistic as the methods' (a median over their input groups). Where the
method's error falls between two points, n is interpolated on log-log axes; beyond the measured
range the 1/n law of independent pairs is assumed from the curve's first or lowest point
(:func:`pairs_for_error`). So the plain k-pair mean reads k, and a few corrupted pairs, which
inflate a mean pair variance, do not inflate every method's credit. Where corrupted pairs fall into
most groups of a large n, the curve there is the scan's own (its plain average would include them),
so a method that beats it is credited with that many pairs. (The older single-pair ratio,
:func:`effective_pairs`, is kept for the benchmark tools.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, PSNRMetric, SSIMMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction


class NMSEMetric(CumulativeIterationMetric):
    """Normalised MSE, sum((pred - ref)^2) / sum(ref^2) per image; lower is better."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False):
        super().__init__()
        self.reduction, self.get_not_nans = reduction, get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("NMSEMetric needs a reference")
        dims = list(range(1, y_pred.dim()))
        err = ((y_pred.float() - y.float()) ** 2).sum(dim=dims)
        return (err / (y.float() ** 2).sum(dim=dims).clamp_min(1e-12))[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None) -> Any:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (value, not_nans) if self.get_not_nans else value


def _masked_sum(values: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sum(np.asarray(values, np.float64)[mask]))


def corrected_reference_energy(reference: np.ndarray, reference_noise_var: np.ndarray, mask: np.ndarray) -> float:
    """Energy of the infinite-pair mean, estimated as sum(ref^2) less the reference's noise."""
    return _masked_sum(np.asarray(reference, np.float64) ** 2 - reference_noise_var, mask)


def nmse_corrected(
    estimate: np.ndarray, reference: np.ndarray, reference_noise_var: np.ndarray, mask: np.ndarray
) -> float:
    """Error against the infinite-pair mean, estimated from a noisy reference (see module doc)."""
    diff2 = (np.asarray(estimate, np.float64) - reference) ** 2
    return _masked_sum(diff2 - reference_noise_var, mask) / corrected_reference_energy(
        reference, reference_noise_var, mask
    )


def per_pair_nmse(
    pair_noise_var: np.ndarray, reference: np.ndarray, reference_noise_var: np.ndarray, mask: np.ndarray
) -> float:
    """Error of a single pair against the infinite-pair mean: the pair-to-pair variance."""
    return _masked_sum(pair_noise_var, mask) / corrected_reference_energy(reference, reference_noise_var, mask)


def effective_pairs(nmse: float, single_pair_nmse: float) -> float:
    """How many averaged pairs give the same error as ``nmse`` if a k-pair mean had single/k (the
    benchmark's ratio; evaluation uses :func:`pairs_for_error`, which needs no such assumption)."""
    return float(single_pair_nmse / nmse) if nmse > 0 else float("inf")


#: fewest pairs an n-pair group must leave out to be scored against them (a variance needs two)
MIN_REFERENCE_PAIRS = 2


@dataclass(frozen=True)
class MeanErrorCurve:
    """The n-pair mean's noise-corrected error on one scan: ``errors[i]`` is the median over the
    ``num_groups[i]`` disjoint groups of ``num_pairs[i]`` consecutive pairs."""

    num_pairs: tuple[int, ...]
    errors: tuple[float, ...]
    num_groups: tuple[int, ...]


def mean_error_curve(
    pairs: np.ndarray, mask: np.ndarray, min_reference: int = MIN_REFERENCE_PAIRS, max_groups: int | None = None
) -> MeanErrorCurve:
    """:class:`MeanErrorCurve` of a series' pairs (P, X, Y, Z) inside ``mask``, for n = 1, 2, 4, ...
    while n leaves ``min_reference`` pairs; the first ``max_groups`` (default: all) disjoint groups of
    n pairs are scored with :func:`nmse_corrected` against the mean of all the other pairs, as
    evaluation scores a method. Give it the evaluation's own group count: the same statistic over the
    same groups, so the plain k-pair mean reads exactly k pairs (pairs differ in quality along a scan:
    the first 4 groups of 2 of the real ds000240 scan are better than its median group of 2)."""
    values = np.asarray(pairs, np.float64)[:, np.asarray(mask, bool)]
    count = values.shape[0]
    total, total_sq = values.sum(axis=0), (values**2).sum(axis=0)
    inside = np.ones(values.shape[1], bool)
    sizes, errors, groups = [], [], []
    n = 1
    while count - n >= min_reference:
        rest = count - n
        scores = []
        for g in range(min(count // n, max_groups or count)):
            group = values[g * n : (g + 1) * n]
            reference = (total - group.sum(axis=0)) / rest
            spread = np.maximum(total_sq - (group**2).sum(axis=0) - rest * reference**2, 0.0) / (rest - 1)
            scores.append(nmse_corrected(group.mean(axis=0), reference, spread / rest, inside))
        sizes.append(n)
        errors.append(float(np.median(scores)))
        groups.append(len(scores))
        n *= 2
    return MeanErrorCurve(tuple(sizes), tuple(errors), tuple(groups))


def pairs_for_error(curve: MeanErrorCurve, error: float) -> float:
    """Effective pairs of an error: the n at which ``curve`` falls to ``error``, interpolated on log-log
    axes, by the 1/n law beyond its first or last point. Only the curve's record lows count (each point
    lower than every one before it, up to its first non-positive one), so a bump at one n, where a few
    corrupted pairs fall into most groups, is passed over instead of moving the crossing past it. An
    error <= 0 is worth infinitely many pairs; NaN when the series gave no curve."""
    if math.isnan(error):
        return float("nan")
    if error <= 0:
        return float("inf")
    lows: list[tuple[float, float]] = []  # (log n, log error), strictly decreasing in error
    for n, e in zip(curve.num_pairs, curve.errors):
        if not e > 0:
            break
        if not lows or math.log(e) < lows[-1][1]:
            lows.append((math.log(n), math.log(e)))
    if not lows:
        return float("nan")
    target = math.log(error)
    for i, (n1, e1) in enumerate(lows):
        if e1 <= target:
            if i == 0:
                return math.exp(n1 + e1 - target)
            n0, e0 = lows[i - 1]
            return math.exp(n0 + (e0 - target) / (e0 - e1) * (n1 - n0))
    return math.exp(lows[-1][0] + lows[-1][1] - target)


def nmse(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Plain normalised MSE inside the mask."""
    diff2 = (np.asarray(estimate, np.float64) - reference) ** 2
    return _masked_sum(diff2, mask) / max(_masked_sum(np.asarray(reference, np.float64) ** 2, mask), 1e-30)


def psnr_ssim(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM (MONAI) inside the head, with the reference's robust range (0.5-99.5th
    percentile inside the mask) as peak / data range, so arbitrary scanner units do not matter."""
    ref_in = np.asarray(reference, np.float64)[mask]
    data_range = float(np.percentile(ref_in, 99.5) - np.percentile(ref_in, 0.5)) or 1.0
    est = torch.as_tensor(np.where(mask, estimate, 0.0), dtype=torch.float32)[None, None]
    ref = torch.as_tensor(np.where(mask, reference, 0.0), dtype=torch.float32)[None, None]
    psnr = PSNRMetric(max_val=data_range)(est, ref).item()
    window = max(3, min(7, min(est.shape[2:]) - (1 - min(est.shape[2:]) % 2)))
    ssim = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=window)(est, ref).item()
    return float(psnr), float(ssim)
