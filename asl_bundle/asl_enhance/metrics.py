"""Scores of an enhanced deltaM: MONAI metrics for training validation, and the noise-corrected
error and effective number of pairs for evaluation without clean data.

With N pairs, an estimate from k pairs is scored against the mean of the other N-k. That reference's
own noise adds its variance (the pairs' spread / (N-k)) to every method's squared error equally, so
subtracting it estimates the error against the infinite-pair mean. A k-pair mean's error falls as
1/k; the *effective number of pairs* of a method is the k whose mean would give its error.
"""

from __future__ import annotations

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
    """How many averaged pairs give the same error as ``nmse`` (a k-pair mean has single/k)."""
    return float(single_pair_nmse / nmse) if nmse > 0 else float("inf")


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
