"""ASL signal physics: the one place for constants and the white-paper equations.

Single-PLD quantification follows the ASL white paper (Alsop et al., MRM 2015;73:102-116). The
forward models used by the simulator are Buxton's general kinetic model with the white paper's
simplification (label decays with the T1 of blood), so that for transit times shorter than the
post-labeling delay they invert the quantification formulas exactly.
"""

from __future__ import annotations

import numpy as np

#: ml/100 g/min per ml/g/s
CBF_UNITS = 6000.0
#: blood-brain partition coefficient lambda, ml/g
BLOOD_BRAIN_PARTITION = 0.9
#: T1 of arterial blood in seconds by field strength in tesla
T1_BLOOD_S = {1.5: 1.35, 3.0: 1.65}
#: T1 of grey matter in seconds by field strength (for M0 recovery correction)
T1_TISSUE_S = {1.5: 1.1, 3.0: 1.3}
#: labeling efficiency alpha without background suppression
LABELING_EFFICIENCY = {"PCASL": 0.85, "CASL": 0.85, "PASL": 0.98}
#: efficiency kept by each background-suppression inversion pulse (common convention)
BS_EFFICIENCY_PER_PULSE = 0.95
DEFAULT_LABELING_DURATION_S = 1.8
#: no ASL timing (PLD, inversion time, labeling or bolus duration, slice time) reaches this many seconds:
#: a larger value in a sidecar can only be milliseconds (the longest PLDs in use are about 4 s)
MAX_ASL_TIMING_S = 10.0

LABELING_TYPES = ("PCASL", "CASL", "PASL")


def t1_blood(field_strength_t: float) -> float:
    """T1 of blood at the nearest tabulated field strength (1.5 T or 3 T)."""
    nearest = min(T1_BLOOD_S, key=lambda b: abs(b - float(field_strength_t)))
    return T1_BLOOD_S[nearest]


def t1_tissue(field_strength_t: float) -> float:
    """T1 of grey matter at the nearest tabulated field strength."""
    nearest = min(T1_TISSUE_S, key=lambda b: abs(b - float(field_strength_t)))
    return T1_TISSUE_S[nearest]


def effective_labeling_efficiency(labeling_type: str, efficiency: float | None = None, bs_pulses: int = 0) -> float:
    """Labeling efficiency, lowered by each background-suppression pulse."""
    alpha = LABELING_EFFICIENCY[labeling_type.upper()] if efficiency is None else float(efficiency)
    return alpha * BS_EFFICIENCY_PER_PULSE ** int(bs_pulses)


def along_slices(value: float | np.ndarray | list, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a scalar or a per-slice vector (last axis = slice axis) to ``shape``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.broadcast_to(arr, shape)
    if arr.ndim != 1 or arr.shape[0] != shape[-1]:
        raise ValueError(f"per-slice values have length {arr.shape}, the volume has {shape[-1]} slices")
    return np.broadcast_to(arr, shape)


def m0_recovery_factor(repetition_time_s: float | None, t1_s: float) -> float:
    """Fraction of full M0 recovered at a short TR; 1 when TR is unknown or long."""
    if repetition_time_s is None or repetition_time_s <= 0:
        return 1.0
    return float(1.0 - np.exp(-float(repetition_time_s) / t1_s))


def pcasl_cbf(
    deltam: np.ndarray,
    m0: np.ndarray | float,
    pld: float | np.ndarray,
    labeling_duration: float = DEFAULT_LABELING_DURATION_S,
    t1b: float = T1_BLOOD_S[3.0],
    alpha: float = LABELING_EFFICIENCY["PCASL"],
    partition: float = BLOOD_BRAIN_PARTITION,
) -> np.ndarray:
    """White-paper single-PLD (P)CASL CBF in ml/100 g/min; ``pld`` may be per slice."""
    deltam = np.asarray(deltam, dtype=np.float64)
    pld = along_slices(pld, deltam.shape)
    numerator = CBF_UNITS * partition * deltam * np.exp(pld / t1b)
    denominator = 2.0 * alpha * t1b * np.asarray(m0, np.float64) * (1.0 - np.exp(-labeling_duration / t1b))
    return _safe_divide(numerator, denominator)


def pasl_cbf(
    deltam: np.ndarray,
    m0: np.ndarray | float,
    inversion_time: float | np.ndarray,
    bolus_duration: float,
    t1b: float = T1_BLOOD_S[3.0],
    alpha: float = LABELING_EFFICIENCY["PASL"],
    partition: float = BLOOD_BRAIN_PARTITION,
) -> np.ndarray:
    """White-paper QUIPSS II / Q2TIPS PASL CBF; TI is BIDS PostLabelingDelay, TI1 the bolus cut-off."""
    deltam = np.asarray(deltam, dtype=np.float64)
    ti = along_slices(inversion_time, deltam.shape)
    numerator = CBF_UNITS * partition * deltam * np.exp(ti / t1b)
    denominator = 2.0 * alpha * bolus_duration * np.asarray(m0, np.float64)
    return _safe_divide(numerator, denominator)


def pcasl_deltam(
    cbf: np.ndarray,
    m0: np.ndarray | float,
    pld: float | np.ndarray,
    labeling_duration: float = DEFAULT_LABELING_DURATION_S,
    transit_time: np.ndarray | float = 0.0,
    t1b: float = T1_BLOOD_S[3.0],
    alpha: float = LABELING_EFFICIENCY["PCASL"],
    partition: float = BLOOD_BRAIN_PARTITION,
) -> np.ndarray:
    """Tissue deltaM of (P)CASL by Buxton's model; equals the white-paper inverse when ATT <= PLD."""
    cbf = np.asarray(cbf, dtype=np.float64)
    pld = along_slices(pld, cbf.shape)
    att = np.broadcast_to(np.asarray(transit_time, np.float64), cbf.shape)
    flow = cbf / CBF_UNITS
    scale = 2.0 * alpha * np.asarray(m0, np.float64) * flow * t1b / partition * np.exp(-att / t1b)
    t = labeling_duration + pld
    filling = 1.0 - np.exp(-np.clip(t - att, 0.0, None) / t1b)
    decayed = np.exp(-np.clip(pld - att, 0.0, None) / t1b) * (1.0 - np.exp(-labeling_duration / t1b))
    signal = np.where(t < att, 0.0, np.where(pld < att, filling, decayed))
    return scale * signal


def pasl_deltam(
    cbf: np.ndarray,
    m0: np.ndarray | float,
    inversion_time: float | np.ndarray,
    bolus_duration: float,
    transit_time: np.ndarray | float = 0.0,
    t1b: float = T1_BLOOD_S[3.0],
    alpha: float = LABELING_EFFICIENCY["PASL"],
    partition: float = BLOOD_BRAIN_PARTITION,
) -> np.ndarray:
    """Tissue deltaM of QUIPSS II PASL by Buxton's model; the white-paper inverse when ATT + TI1 <= TI."""
    cbf = np.asarray(cbf, dtype=np.float64)
    ti = along_slices(inversion_time, cbf.shape)
    att = np.broadcast_to(np.asarray(transit_time, np.float64), cbf.shape)
    flow = cbf / CBF_UNITS
    delivered = np.clip(np.minimum(ti - att, bolus_duration), 0.0, None)
    return 2.0 * alpha * np.asarray(m0, np.float64) * flow / partition * delivered * np.exp(-ti / t1b)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Quotient that is 0 where the denominator is 0 (outside the head M0 is ~0)."""
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    out = np.zeros(numerator.shape, dtype=np.float64)
    ok = np.abs(denominator) > 0
    out[ok] = numerator[ok] / denominator[ok]
    return out
