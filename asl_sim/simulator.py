"""Synthetic BIDS-ASL subjects for training and benchmarking the ASL enhancement bundle.

Why this exists: a network trained on synthetic pairs only transfers to real scans if the synthetic
anatomy, perfusion texture and, above all, the pair-to-pair fluctuation look like real data. Anatomy
comes from the MNI ICBM152 tissue maps (bundled with nilearn), warped per subject and averaged onto
clinical voxels; signal comes from the bundle's physics module; the noise model (spatially
correlated physiological fluctuation, per-pair level jitter, white thermal noise in magnitude
images, residual motion, corrupted pairs) was tuned against a real 3D spiral pCASL series with
``noise_stats.py``.

Public entry points: :func:`simulate_subject` (one subject in memory), :func:`write_bids_subject`
and :func:`write_dataset_files` (BIDS on disk), :func:`noise_statistics` and :func:`read_bids_asl`
(measure pair-to-pair fluctuation of real or simulated series).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from asl_enhance.bids import find_asl_series, load_asl_series
from asl_enhance.outputs import atomic_write
from asl_enhance.physics import (
    LABELING_EFFICIENCY,
    effective_labeling_efficiency,
    m0_recovery_factor,
    pasl_deltam,
    pcasl_deltam,
    t1_blood,
    t1_tissue,
)
from scipy import ndimage

#: relative proton density (M0) of each tissue class, GM = 1
PROTON_DENSITY = {"gm": 1.0, "wm": 0.8, "csf": 1.15, "scalp": 0.75}
#: T1 of WM, CSF and scalp (fat/muscle) relative to / in seconds, for control images without BS
T1_WM_OVER_GM = 0.65
T1_CSF_S = 4.2
T1_SCALP_S = 0.4
#: world (MNI mm) point the field of view is centred on, before the random translation
HEAD_CENTRE_MNI = np.array([0.0, -18.0, 12.0])
TISSUES = ("gm", "wm", "csf", "scalp")


# --------------------------------------------------------------------------------------- parameters
@dataclass
class Acquisition:
    """Protocol of one simulated series; fields map onto BIDS-ASL sidecar keys."""

    labeling_type: str
    field_strength: float
    readout: str  # "3D" or "2D"
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    pld: float  # PCASL PLD, or PASL TI (BIDS PostLabelingDelay), of the first slice
    labeling_duration: float  # PCASL tau, or PASL TI1 (bolus cut-off delay)
    labeling_efficiency: float
    efficiency_is_default: bool
    slice_time: float  # seconds between 2D slices, 0 for 3D
    background_suppression: bool
    bs_pulses: int
    repetition_time: float
    control_first: bool
    m0_type: str  # "Included" or "Separate"
    num_m0: int
    m0_repetition_time: float
    num_pairs: int

    def slice_plds(self) -> np.ndarray:
        """Per-slice PLD (2D readouts acquire later slices later)."""
        return self.pld + np.arange(self.shape[2]) * self.slice_time


@dataclass
class NoiseModel:
    """Pair-to-pair fluctuation model; defaults were tuned on ds000240 (see noise_stats.py)."""

    snr: float  # target per-pair GM SNR of the deltaM
    inside_over_background: float  # inside-head / thermal std of the difference (Gaussian)
    phys_sigma_vox: tuple[float, float, float]  # Gaussian correlation of physiological noise
    psf_sigma_vox: tuple[float, float, float]  # readout point-spread blur of the images
    level_sd: float  # per-pair multiplicative gain spread
    pair_sigma_spread: float  # log-normal spread of the physiological noise amplitude between pairs
    gradient_sd: float  # per-pair low-order (linear) spatial gain fluctuation
    perfusion_dependence: float  # how much more fluctuation where perfusion is high
    motion_shift_vox: float  # sd of the residual label-vs-control shift
    motion_rot_deg: float
    corrupt_prob: float
    corrupted_pairs: list[int] = field(default_factory=list)


def sample_acquisition(rng: np.random.Generator, num_pairs: int, quick: bool = False) -> Acquisition:
    """Draw a plausible clinical protocol around the white-paper defaults."""
    labeling_type = "PCASL" if rng.random() < 0.8 else "PASL"
    field_strength = 3.0 if rng.random() < 0.75 else 1.5
    readout = "3D" if rng.random() < 0.55 else "2D"
    if quick:
        shape, voxel = (32, 32, 8), (7.0, 7.0, 12.0)
    else:
        nxy = int(rng.choice([64, 72, 80, 88, 96]))
        inplane = float(np.clip(rng.uniform(210.0, 250.0) / nxy, 2.5, 4.0))
        thick = rng.uniform(2.5, 4.5) if readout == "3D" else rng.uniform(4.0, 6.0)
        nz = int(np.clip(round(rng.uniform(90.0, 140.0) / thick), 10, 48))
        shape, voxel = (nxy, nxy, nz), (round(inplane, 3), round(inplane, 3), round(float(thick), 3))
    if labeling_type == "PCASL":
        pld, duration = rng.uniform(1.5, 2.0), rng.uniform(1.5, 1.8)
    else:
        pld, duration = rng.uniform(1.8, 2.0), rng.uniform(0.7, 0.8)
    default_eff = LABELING_EFFICIENCY[labeling_type]
    is_default = bool(rng.random() < 0.4)
    efficiency = default_eff if is_default else float(np.clip(default_eff + rng.normal(0, 0.04), 0.7, 0.99))
    bs = bool(rng.random() < 0.75)
    bs_pulses = int(rng.integers(2, 5)) if bs else 0
    m0_type = "Included" if rng.random() < 0.5 else "Separate"
    short_m0_tr = rng.random() < 0.3
    tr = round(float(rng.uniform(3.5, 5.0)), 3)
    m0_tr = (
        tr
        if m0_type == "Included"
        else round(float(rng.uniform(2.5, 4.0) if short_m0_tr else rng.uniform(5.0, 8.0)), 3)
    )
    return Acquisition(
        labeling_type=labeling_type,
        field_strength=field_strength,
        readout=readout,
        shape=shape,
        voxel_size=voxel,
        pld=round(float(pld), 3),
        labeling_duration=round(float(duration), 3),
        labeling_efficiency=round(efficiency, 3),
        efficiency_is_default=is_default,
        slice_time=0.0 if readout == "3D" else round(float(rng.uniform(0.030, 0.045)), 4),
        background_suppression=bs,
        bs_pulses=bs_pulses,
        repetition_time=tr,
        control_first=bool(rng.random() < 0.5),
        m0_type=m0_type,
        num_m0=int(rng.integers(1, 3)) if m0_type == "Included" else 1,
        m0_repetition_time=m0_tr,
        num_pairs=num_pairs,
    )


def sample_noise(rng: np.random.Generator, acq: Acquisition) -> NoiseModel:
    """Draw noise parameters; log-uniform SNR so that low SNR is well represented."""
    in_plane = rng.uniform(0.35, 0.7)
    through = rng.uniform(0.2, 0.7) * min(1.0, 3.5 / acq.voxel_size[2])
    if acq.readout == "3D" and rng.random() < 0.5:  # spiral: in-plane blur
        psf = (rng.uniform(0.2, 0.5),) * 2 + (rng.uniform(0.0, 0.3),)
    elif acq.readout == "3D":  # GRASE: through-plane T2 blur
        psf = (rng.uniform(0.0, 0.2),) * 2 + (rng.uniform(0.4, 0.8),)
    else:  # 2D EPI: mild phase-encode blur
        psf = (0.0, rng.uniform(0.2, 0.5), 0.0)
    return NoiseModel(
        snr=float(np.exp(rng.uniform(np.log(0.4), np.log(3.0)))),
        inside_over_background=float(rng.uniform(2.0, 5.0)),
        phys_sigma_vox=(float(in_plane), float(in_plane * rng.uniform(0.85, 1.15)), float(through)),
        psf_sigma_vox=tuple(float(s) for s in psf),
        level_sd=float(rng.uniform(0.06, 0.13)),
        pair_sigma_spread=float(rng.uniform(0.2, 0.45)),
        gradient_sd=float(rng.uniform(0.02, 0.08)),
        perfusion_dependence=float(rng.uniform(0.1, 0.4)),
        motion_shift_vox=float(rng.uniform(0.003, 0.025)),
        motion_rot_deg=float(rng.uniform(0.005, 0.05)),
        corrupt_prob=0.05,
    )


NOISE_MODELS = ("physiological", "white")


def white_noise(noise: NoiseModel) -> NoiseModel:
    """The same per-pair SNR as independent white (thermal) noise only: no spatial correlation, no
    per-pair gain or amplitude jitter, the same level inside the head as in the background.

    Why: the textbook denoising assumption, kept as the alternative to compare against the
    physiological model when asking which one teaches a network that transfers to real scans.
    Motion and corrupted pairs are kept, so only the fluctuation model differs.
    """
    return replace(
        noise,
        inside_over_background=1.0,
        level_sd=0.0,
        pair_sigma_spread=0.0,
        gradient_sd=0.0,
        perfusion_dependence=0.0,
    )


# ----------------------------------------------------------------------------------------- anatomy
@lru_cache(maxsize=1)
def load_templates() -> tuple[np.ndarray, np.ndarray]:
    """MNI ICBM152 2009a tissue fractions at 2 mm (gm, wm, csf, scalp), loaded once per process.

    The bundled T1 is skull-stripped, so its non-zero region is the brain mask; CSF is that mask minus
    GM and WM, and a scalp shell (skull left empty, M0 ~ 0) is grown from the distance to the brain.
    """
    import nilearn

    data_dir = Path(nilearn.__file__).parent / "datasets" / "data"
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    maps = {}
    for key in ("gm", "wm", "t1"):
        img = nib.load(data_dir / name.format(key))
        arr = np.asarray(img.dataobj, dtype=np.float32)[:196, :232, :188]
        maps[key] = arr.reshape(98, 2, 116, 2, 94, 2).mean(axis=(1, 3, 5))
        affine = img.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
    brain = ndimage.binary_fill_holes(maps["t1"] > 5.0)
    gm, wm = maps["gm"] / 255.0, maps["wm"] / 255.0
    distance = ndimage.distance_transform_edt(~brain, sampling=2.0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0) + ((distance > 0) & (distance <= 2.0))
    scalp = ((distance > 8.0) & (distance <= 15.0)).astype(np.float32)
    stack = np.stack([gm, wm, csf, ndimage.gaussian_filter(scalp, 0.7)]).astype(np.float32)
    return stack, affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: tuple[float, ...]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field (why: low-frequency texture, bias, displacement)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return (noise - noise.mean()) / max(float(noise.std()), 1e-12)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix from three small angles (x, y, z) in degrees."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def output_affine(acq: Acquisition) -> np.ndarray:
    """RAS affine with the voxel sizes, field of view centred on the world origin."""
    vox = np.asarray(acq.voxel_size, dtype=np.float64)
    affine = np.diag(np.append(vox, 1.0))
    affine[:3, 3] = -(np.asarray(acq.shape) - 1) / 2.0 * vox
    return affine


def _supersampling(acq: Acquisition) -> tuple[int, int, int]:
    """Sub-voxels per axis so that partial volume is computed at about 2 mm."""
    return tuple(max(1, int(np.ceil(v / 2.0))) for v in acq.voxel_size)


def _upsample(arr: np.ndarray, shape: tuple[int, ...] | np.ndarray, order: int) -> np.ndarray:
    """Resample a smooth field onto a finer grid covering the same field of view."""
    zoom = tuple(int(n) / m for n, m in zip(shape, arr.shape))
    return ndimage.zoom(arr, zoom, order=order, grid_mode=True, mode="nearest")


def _block_mean(arr: np.ndarray, ss: tuple[int, int, int]) -> np.ndarray:
    """Average sub-voxels back onto the acquisition grid (partial volume)."""
    nx, ny, nz = (s // f for s, f in zip(arr.shape, ss))
    return arr.reshape(nx, ss[0], ny, ss[1], nz, ss[2]).mean(axis=(1, 3, 5))


def warp_anatomy(rng: np.random.Generator, acq: Acquisition) -> dict:
    """Random affine + elastic warp of the MNI tissue maps, averaged onto the clinical grid.

    Returns tissue fractions on the acquisition grid, the MNI coordinates of every voxel (for
    territory-based lesions and transit times) and of every sub-voxel (for sharp lesion edges).
    """
    stack, mni_affine = load_templates()
    ss = _supersampling(acq)
    shape = np.asarray(acq.shape)
    angles = rng.normal(0.0, 3.0, 3)
    scales = rng.uniform(0.9, 1.1, 3)
    linear = _rotation(angles) @ np.diag(scales)
    translation = HEAD_CENTRE_MNI + rng.normal(0.0, [4.0, 5.0, 8.0])
    disp_amp = rng.uniform(1.0, 4.0)
    coarse = rng.standard_normal((3, 5, 5, 5)) * disp_amp
    displacement = np.stack([_upsample(_upsample(c, shape, order=3), shape * np.asarray(ss), order=1) for c in coarse])
    axes = [(np.arange(n * f) + 0.5) / f - 0.5 for n, f in zip(shape, ss)]
    index = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    out_aff = output_affine(acq)
    world = out_aff[:3, :3] @ index + out_aff[:3, 3:4]
    mni = linear @ world + translation[:, None] + displacement.reshape(3, -1)
    del displacement
    template_index = np.linalg.solve(mni_affine[:3, :3], mni - mni_affine[:3, 3:4])
    ss_shape = tuple(shape * np.asarray(ss))
    tissues = {}
    for name, channel in zip(TISSUES, stack):
        sampled = ndimage.map_coordinates(channel, template_index, order=1, mode="constant", cval=0.0)
        tissues[name] = _block_mean(sampled.reshape(ss_shape), ss)
    total = sum(tissues[t] for t in ("gm", "wm", "csf"))
    excess = np.clip(total, 1.0, None)
    for name in ("gm", "wm", "csf"):
        tissues[name] = (tissues[name] / excess).astype(np.float32)
    mni_ss = mni.reshape((3,) + ss_shape).astype(np.float32)
    mni_vox = np.stack([_block_mean(c, ss) for c in mni_ss])
    params = {
        "rotation_deg": angles.round(3).tolist(),
        "scale": scales.round(4).tolist(),
        "translation_mm": translation.round(2).tolist(),
        "elastic_mm": round(float(disp_amp), 3),
    }
    return {"tissues": tissues, "mni_vox": mni_vox, "mni_ss": mni_ss, "ss": ss, "params": params}


# --------------------------------------------------------------------------------------- perfusion
TERRITORIES = ("MCA", "ACA", "PCA")


def territory_mask(coords: np.ndarray, name: str, side: int) -> np.ndarray:
    """Crude vascular territory in MNI mm (side +1 right, -1 left): where lesions live."""
    x, y, z = coords[0] * side, coords[1], coords[2]
    if name == "ACA":
        return (x >= 0) & (x < 22 + 0.1 * z) & (y > -55) & (z > 0)
    if name == "PCA":
        return (x >= 0) & ((y < -65) | ((y < -35) & (z < 5)))
    return (x >= 22 + 0.1 * np.maximum(z, 0)) & (y >= -65) & ~((y < -35) & (z < 5))


def watershed_weight(coords: np.ndarray) -> np.ndarray:
    """Closeness to the ACA/MCA and MCA/PCA borders (0..1): transit is longest there."""
    x, y, z = np.abs(coords[0]), coords[1], coords[2]
    aca_mca = np.exp(-((x - 22 - 0.1 * np.maximum(z, 0)) ** 2) / (2 * 8.0**2)) * (z > 0)
    mca_pca = np.exp(-((y + 65) ** 2) / (2 * 10.0**2))
    return np.clip(aca_mca + mca_pca, 0.0, 1.0)


def make_lesion(rng: np.random.Generator, anatomy: dict) -> tuple[np.ndarray, dict]:
    """Sharp-edged hypo- or hyper-perfused part of one vascular territory (fraction per voxel)."""
    shape = anatomy["tissues"]["gm"].shape
    if rng.random() < 0.3:
        return np.zeros(shape, np.float32), {"kind": "none"}
    name, side = str(rng.choice(TERRITORIES)), int(rng.choice([-1, 1]))
    coords = anatomy["mni_ss"]
    region = territory_mask(coords, name, side)
    near_centre = np.sum((coords - HEAD_CENTRE_MNI[:, None, None, None]) ** 2, axis=0) < 55.0**2
    candidates = np.flatnonzero(region & near_centre)
    if candidates.size == 0:
        return np.zeros(shape, np.float32), {"kind": "none"}
    centre = coords.reshape(3, -1)[:, rng.choice(candidates)]
    radius = rng.uniform(15.0, 40.0)
    if rng.random() > 0.3:  # part of the territory
        region &= np.sum((coords - centre[:, None, None, None]) ** 2, axis=0) < radius**2
    hypo = rng.random() < 0.7
    factor = rng.uniform(0.1, 0.5) if hypo else rng.uniform(1.5, 2.0)
    fraction = _block_mean(region.astype(np.float32), anatomy["ss"])
    params = {
        "kind": "hypo" if hypo else "hyper",
        "territory": name,
        "side": "R" if side > 0 else "L",
        "cbf_factor": round(float(factor), 3),
        "radius_mm": round(float(radius), 1),
        "att_increase_s": round(float(rng.uniform(0.3, 0.8)) if hypo else 0.0, 3),
    }
    return fraction, params


def perfusion_maps(rng: np.random.Generator, anatomy: dict, acq: Acquisition) -> tuple[dict, dict]:
    """CBF (ml/100 g/min) with regional texture and a territory lesion, ATT (s), vessel fraction."""
    tissues, coords = anatomy["tissues"], anatomy["mni_vox"]
    shape = tissues["gm"].shape
    vox = np.asarray(acq.voxel_size)
    cbf_gm, cbf_wm = rng.uniform(50.0, 80.0), rng.uniform(15.0, 30.0)
    regional = 1.0 + 0.2 * np.tanh(_smooth_field(rng, shape, tuple(25.0 / vox)))
    texture = 1.0 + 0.08 * _smooth_field(rng, shape, tuple(5.0 / vox))
    lesion, lesion_params = make_lesion(rng, anatomy)
    lesion_factor = 1.0 + (lesion_params.get("cbf_factor", 1.0) - 1.0) * lesion
    cbf = (tissues["gm"] * cbf_gm + tissues["wm"] * cbf_wm) * regional * texture * lesion_factor
    att_base = rng.uniform(0.8, 1.4)
    posterior = np.clip((-coords[1] - 20.0) / 80.0, 0.0, 1.0)
    att = (
        att_base * (1.0 + 0.25 * posterior)
        + 0.3 * watershed_weight(coords)
        + 0.3 * tissues["wm"]
        + 0.08 * _smooth_field(rng, shape, tuple(20.0 / vox))
        + lesion_params.get("att_increase_s", 0.0) * lesion
    )
    att = np.clip(att, 0.7, 2.0 + lesion_params.get("att_increase_s", 0.0))
    vessels = vessel_fraction(rng, tissues, vox)
    params = {
        "cbf_gm": round(float(cbf_gm), 2),
        "cbf_wm": round(float(cbf_wm), 2),
        "att_base_s": round(float(att_base), 3),
        "lesion": lesion_params,
    }
    return {
        "cbf": cbf.astype(np.float32),
        "att": att.astype(np.float32),
        "lesion": lesion,
        "vessels": vessels,
    }, params


def vessel_fraction(rng: np.random.Generator, tissues: dict, vox: np.ndarray) -> np.ndarray:
    """Sparse serpiginous vessel-like tubes near the cortical surface (crossing of two level sets)."""
    shape = tissues["gm"].shape
    f1 = _smooth_field(rng, shape, tuple(6.0 / vox))
    f2 = _smooth_field(rng, shape, tuple(6.0 / vox))
    tubes = np.exp(-(f1**2 + f2**2) / (2 * 0.12**2))
    brain = (tissues["gm"] + tissues["wm"] + tissues["csf"]) > 0.5
    deep = ndimage.binary_erosion(brain, iterations=max(1, int(round(10.0 / vox[0]))))
    surface = ndimage.gaussian_filter((brain & ~deep).astype(np.float32), 0.7)
    return (tubes * surface * np.clip(tissues["csf"] + tissues["gm"], 0, 1)).astype(np.float32)


# ------------------------------------------------------------------------------------------ signal
def make_m0(rng: np.random.Generator, tissues: dict, vox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fully relaxed M0 (scanner units) with a smooth receive-coil bias, and the bias itself."""
    bias = 1.0 + 0.12 * np.tanh(_smooth_field(rng, tissues["gm"].shape, tuple(60.0 / vox)))
    scalp_texture = 1.0 + 0.25 * _smooth_field(rng, tissues["gm"].shape, tuple(4.0 / vox))
    pd = sum(PROTON_DENSITY[t] * tissues[t] for t in ("gm", "wm", "csf"))
    pd = pd + PROTON_DENSITY["scalp"] * tissues["scalp"] * scalp_texture
    scale = rng.uniform(500.0, 3000.0)
    return (scale * pd * bias).astype(np.float32), bias


def control_fraction(rng: np.random.Generator, acq: Acquisition, tissues: dict) -> tuple[np.ndarray, dict]:
    """Control signal / M0 per voxel: 5-20 % in tissue with background suppression, T1 recovery without."""
    if acq.background_suppression:
        frac = {"gm": rng.uniform(0.05, 0.2)}
        frac["wm"] = frac["gm"] * rng.uniform(0.6, 1.4)
        frac["csf"], frac["scalp"] = rng.uniform(0.02, 0.3), rng.uniform(0.05, 0.25)
    else:
        t1gm = t1_tissue(acq.field_strength)
        t1s = {"gm": t1gm, "wm": T1_WM_OVER_GM * t1gm, "csf": T1_CSF_S, "scalp": T1_SCALP_S}
        frac = {t: 1.0 - np.exp(-acq.repetition_time / t1s[t]) for t in TISSUES}
    weights = sum(frac[t] * PROTON_DENSITY[t] * tissues[t] for t in TISSUES)
    pd = sum(PROTON_DENSITY[t] * tissues[t] for t in TISSUES)
    ratio = np.where(pd > 1e-3, weights / np.maximum(pd, 1e-3), frac["gm"])
    return ratio.astype(np.float32), {t: round(float(v), 4) for t, v in frac.items()}


def tissue_deltam(acq: Acquisition, cbf: np.ndarray, att: np.ndarray, m0: np.ndarray) -> np.ndarray:
    """Noise-free tissue deltaM from the bundle's physics (per-slice PLD for 2D readouts)."""
    alpha = effective_labeling_efficiency(acq.labeling_type, acq.labeling_efficiency, acq.bs_pulses)
    t1b = t1_blood(acq.field_strength)
    pld = acq.slice_plds()
    if acq.labeling_type == "PASL":
        return pasl_deltam(cbf, m0, pld, acq.labeling_duration, att, t1b=t1b, alpha=alpha)
    return pcasl_deltam(cbf, m0, pld, acq.labeling_duration, att, t1b=t1b, alpha=alpha)


def arterial_deltam(acq: Acquisition, att: np.ndarray, vessels: np.ndarray, gm_deltam: float) -> np.ndarray:
    """Arterial transit artefact: label still in arteries where transit exceeds the PLD.

    Heuristic, not a kinetic model: the fraction of the bolus not yet delivered, (ATT - PLD) / tau,
    times a brightness of a few GM levels in vessel voxels.
    """
    late = np.clip((att - acq.slice_plds()) / max(acq.labeling_duration, 0.3), 0.0, 1.0)
    return (4.0 * gm_deltam * vessels * late).astype(np.float32)


def high_perfusion_mask(mean_deltam: np.ndarray, head: np.ndarray, quantile: float = 0.8) -> np.ndarray:
    """Top-20 % voxels of the smoothed mean deltaM inside the head: the 'GM-ish' voxels for SNR."""
    smooth = ndimage.gaussian_filter(mean_deltam, 1.0)
    inside = smooth[head]
    return head & (smooth >= np.quantile(inside, quantile)) if inside.size else head


def head_mask(m0: np.ndarray) -> np.ndarray:
    """Head = M0 above a fraction of its robust maximum, holes filled."""
    threshold = 0.15 * np.percentile(m0, 99.5)
    return ndimage.binary_fill_holes(m0 > threshold)


# ------------------------------------------------------------------------------------------- noise
def _label_motion(
    rng: np.random.Generator, shape: tuple[int, ...], shift_vox: float, rot_deg: float, voxel: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Affine (matrix, offset) in voxel indices for a small rigid motion about the volume centre."""
    rot = _rotation(rng.normal(0.0, rot_deg, 3))
    matrix = np.diag(1.0 / voxel) @ rot @ np.diag(voxel)
    centre = (np.asarray(shape) - 1) / 2.0
    offset = centre - matrix @ centre + rng.normal(0.0, shift_vox, 3)
    return matrix, offset


def _magnitude(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude image with complex Gaussian thermal noise (Rician at low signal, always positive)."""
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag).astype(np.float32)


def simulate_pairs(
    rng: np.random.Generator,
    acq: Acquisition,
    noise: NoiseModel,
    control_clean: np.ndarray,
    deltam: np.ndarray,
    head_weight: np.ndarray,
    gm_deltam: float,
) -> tuple[np.ndarray, ...]:
    """Noisy control and label images (num_pairs, X, Y, Z) plus the thermal sigma used.

    The physiological part (correlated field, per-pair gain, low-order gradient) is put on the
    label, the readout blur on both, and independent thermal noise on each magnitude image.
    """
    shape = deltam.shape
    voxel = np.asarray(acq.voxel_size)
    sigma_total = gm_deltam / noise.snr
    sigma_diff_thermal = sigma_total / noise.inside_over_background
    sigma_phys = np.sqrt(max(sigma_total**2 - sigma_diff_thermal**2, 0.0))
    sigma_thermal = sigma_diff_thermal / np.sqrt(2.0)
    corr_sigma = tuple(np.hypot(noise.phys_sigma_vox, noise.psf_sigma_vox))
    perf = 1.0 + noise.perfusion_dependence * (np.clip(deltam / max(gm_deltam, 1e-9), 0, 2) - 1.0)
    weight = head_weight * perf
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    control_blur = ndimage.gaussian_filter(control_clean, noise.psf_sigma_vox)
    controls, labels = [], []
    for pair in range(acq.num_pairs):
        corrupted = pair in noise.corrupted_pairs
        gain = 1.0 + noise.level_sd * rng.standard_normal()
        gain = gain + noise.gradient_sd * np.tensordot(rng.standard_normal(3), grid, axes=1)
        amplitude = sigma_phys * np.exp(noise.pair_sigma_spread * rng.standard_normal())
        phys = _smooth_field(rng, shape, corr_sigma) * amplitude * weight
        if corrupted and rng.random() < 0.5:  # spike / level jump
            gain = gain * rng.choice([rng.uniform(-0.5, 0.3), rng.uniform(1.8, 2.5)])
        label_clean = control_clean - (deltam * gain + phys)
        shift, rot = (0.3, 0.6) if corrupted else (noise.motion_shift_vox, noise.motion_rot_deg)
        matrix, offset = _label_motion(rng, shape, shift, rot, voxel)
        label_clean = ndimage.affine_transform(label_clean, matrix, offset, order=1, mode="nearest")
        label_blur = ndimage.gaussian_filter(label_clean, noise.psf_sigma_vox)
        controls.append(_magnitude(rng, control_blur, sigma_thermal))
        labels.append(_magnitude(rng, label_blur, sigma_thermal))
    return np.stack(controls), np.stack(labels), float(sigma_thermal), float(sigma_phys)


# ----------------------------------------------------------------------------------------- subject
def subject_rng(seed: int, subject: int) -> np.random.Generator:
    """Independent, reproducible stream per (seed, subject)."""
    return np.random.default_rng([int(seed), int(subject)])


def simulate_subject(
    seed: int, subject: int, num_pairs: int = 8, quick: bool = False, noise_model: str = "physiological"
) -> dict:
    """Make one subject in memory: images, truth maps and the parameters that produced them.

    ``noise_model`` "white" swaps the fluctuation for :func:`white_noise`; anatomy, perfusion and
    protocol stay those of the same (seed, subject).
    """
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")
    rng = subject_rng(seed, subject)
    acq = sample_acquisition(rng, num_pairs, quick)
    noise = sample_noise(rng, acq)
    if noise_model == "white":
        noise = white_noise(noise)
    noise.corrupted_pairs = [int(i) for i in np.flatnonzero(rng.random(num_pairs) < noise.corrupt_prob)]
    vox = np.asarray(acq.voxel_size)
    anatomy = warp_anatomy(rng, acq)
    tissues = anatomy["tissues"]
    perf, perf_params = perfusion_maps(rng, anatomy, acq)
    m0, _ = make_m0(rng, tissues, vox)
    ratio, control_params = control_fraction(rng, acq, tissues)
    control_clean = m0 * ratio
    deltam = tissue_deltam(acq, perf["cbf"], perf["att"], m0)
    brain = (tissues["gm"] + tissues["wm"]) > 0.5
    gm_ref = float(np.mean(deltam[tissues["gm"] > 0.6])) if np.any(tissues["gm"] > 0.6) else float(deltam.max())
    deltam = (deltam + arterial_deltam(acq, perf["att"], perf["vessels"], gm_ref)).astype(np.float32)
    head = head_mask(m0)
    gm_deltam = float(np.mean(deltam[high_perfusion_mask(deltam, head & brain)]))
    head_weight = ndimage.gaussian_filter(
        np.clip(tissues["gm"] + tissues["wm"] + tissues["csf"] + tissues["scalp"], 0, 1), 1.0
    )
    control, label, sigma_thermal, sigma_phys = simulate_pairs(
        rng, acq, noise, control_clean, deltam, head_weight, gm_deltam
    )
    recovery = m0_recovery_factor(acq.m0_repetition_time, t1_tissue(acq.field_strength))
    m0_scans = np.stack([_magnitude(rng, m0 * recovery, sigma_thermal) for _ in range(acq.num_m0)])
    truth_deltam = ndimage.gaussian_filter(deltam, noise.psf_sigma_vox).astype(np.float32)
    measured = noise_statistics(control - label, m0_scans[0])
    params = {
        "seed": int(seed),
        "subject": int(subject),
        "acquisition": asdict(acq),
        "noise_model": noise_model,
        "noise": asdict(noise),
        "sigma_thermal": round(sigma_thermal, 5),
        "sigma_physiological": round(sigma_phys, 5),
        "gm_deltam": round(gm_deltam, 5),
        "gm_deltam_over_m0_percent": round(
            100 * gm_deltam / float(np.mean(m0[high_perfusion_mask(deltam, head & brain)])), 4
        ),
        "m0_recovery_factor": round(recovery, 5),
        "control_over_m0": control_params,
        "anatomy": anatomy["params"],
        "perfusion": perf_params,
        "measured_noise_statistics": {k: v if isinstance(v, (int, list)) else round(v, 4) for k, v in measured.items()},
        "truth_deltam_note": "expected control-label of one pair, including the readout blur and "
        "arterial transit signal; truth CBF is tissue perfusion before the blur",
    }
    return {
        "control": control,
        "label": label,
        "m0": m0_scans,
        "truth_deltam": truth_deltam,
        "truth_cbf": perf["cbf"],
        "att": perf["att"],
        "lesion_mask": ((perf["lesion"] >= 0.5) & (tissues["gm"] + tissues["wm"] > 0.1)).astype(np.uint8),
        "gm": tissues["gm"],
        "wm": tissues["wm"],
        "csf": tissues["csf"],
        "affine": output_affine(acq),
        "acquisition": acq,
        "params": params,
    }


# -------------------------------------------------------------------------------------------- BIDS
def volume_types(acq: Acquisition) -> list[str]:
    """aslcontext rows: included M0 first, then pairs in the subject's control/label order."""
    pair = ["control", "label"] if acq.control_first else ["label", "control"]
    m0 = ["m0scan"] * acq.num_m0 if acq.m0_type == "Included" else []
    return m0 + pair * acq.num_pairs


def asl_series(sim: dict) -> np.ndarray:
    """4D (X, Y, Z, V) float32 series ordered as :func:`volume_types`."""
    acq = sim["acquisition"]
    volumes = list(sim["m0"]) if acq.m0_type == "Included" else []
    for control, label in zip(sim["control"], sim["label"]):
        volumes += [control, label] if acq.control_first else [label, control]
    return np.stack(volumes, axis=-1).astype(np.float32)


def asl_sidecar(acq: Acquisition) -> dict:
    """BIDS-ASL sidecar for the simulated protocol."""
    meta: dict = {
        "ArterialSpinLabelingType": acq.labeling_type,
        "MRAcquisitionType": acq.readout,
        "MagneticFieldStrength": acq.field_strength,
        "M0Type": acq.m0_type,
    }
    plds = acq.slice_plds()
    meta["PostLabelingDelay"] = acq.pld if acq.readout == "3D" else [round(float(p), 4) for p in plds]
    if acq.readout == "2D":
        meta["SliceTiming"] = [round(float(t), 4) for t in plds - acq.pld]
    if acq.labeling_type == "PASL":
        meta.update(
            {
                "BolusCutOffFlag": True,
                "BolusCutOffTechnique": "Q2TIPS",
                "BolusCutOffDelayTime": acq.labeling_duration,
            }
        )
    else:
        meta["LabelingDuration"] = acq.labeling_duration
    if not acq.efficiency_is_default:
        meta["LabelingEfficiency"] = acq.labeling_efficiency
    meta.update(
        {
            "BackgroundSuppression": acq.background_suppression,
            "RepetitionTimePreparation": acq.repetition_time,
            "TotalAcquiredPairs": acq.num_pairs,
            "VascularCrushing": False,
            "AcquisitionVoxelSize": list(acq.voxel_size),
        }
    )
    if acq.background_suppression:
        meta["BackgroundSuppressionNumberPulses"] = acq.bs_pulses
    return meta


def _atomic_write_text(path: Path, text: str) -> None:
    """Text through the bundle's atomic writer, so readers never see half a file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _atomic_write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """NIfTI (in the array's own dtype) through the bundle's atomic writer."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".partial.nii.gz")


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n"


def write_bids_subject(sim: dict, out_dir: Path | str) -> Path:
    """Write one simulated subject as BIDS-ASL plus its ground truth under derivatives/simulation."""
    out_dir = Path(out_dir)
    acq: Acquisition = sim["acquisition"]
    sub = f"sub-{sim['params']['subject']:02d}"
    perf = out_dir / sub / "perf"
    affine = sim["affine"]
    _atomic_write_nifti(perf / f"{sub}_asl.nii.gz", asl_series(sim), affine)
    _atomic_write_text(perf / f"{sub}_aslcontext.tsv", "volume_type\n" + "\n".join(volume_types(acq)) + "\n")
    _atomic_write_text(perf / f"{sub}_asl.json", _json(asl_sidecar(acq)))
    if acq.m0_type == "Separate":
        _atomic_write_nifti(perf / f"{sub}_m0scan.nii.gz", sim["m0"][0], affine)
        m0_meta = {
            "IntendedFor": f"perf/{sub}_asl.nii.gz",
            "RepetitionTimePreparation": acq.m0_repetition_time,
            "MRAcquisitionType": acq.readout,
            "AcquisitionVoxelSize": list(acq.voxel_size),
        }
        _atomic_write_text(perf / f"{sub}_m0scan.json", _json(m0_meta))
    truth = out_dir / "derivatives" / "simulation" / sub / "perf"
    maps = {
        "desc-truth_deltam": sim["truth_deltam"],
        "desc-truth_cbf": sim["truth_cbf"],
        "desc-truth_att": sim["att"],
        "desc-lesion_mask": sim["lesion_mask"],
        "label-GM_probseg": sim["gm"],
        "label-WM_probseg": sim["wm"],
        "label-CSF_probseg": sim["csf"],
    }
    for suffix, data in maps.items():
        _atomic_write_nifti(truth / f"{sub}_{suffix}.nii.gz", data, affine)
    _atomic_write_text(truth / f"{sub}_desc-truth_deltam.json", _json(sim["params"]))
    return perf


def write_dataset_files(out_dir: Path | str, subjects: list[str]) -> None:
    """Top-level BIDS files; participants.tsv keeps rows of earlier runs (disjoint cohorts)."""
    out_dir = Path(out_dir)
    desc = {
        "Name": "Synthetic ASL (MNI ICBM152 anatomy)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0",
        "GeneratedBy": [{"Name": "asl_simulator"}],
    }
    _atomic_write_text(out_dir / "dataset_description.json", _json(desc))
    participants = out_dir / "participants.tsv"
    rows = set(subjects)
    if participants.exists():
        rows |= {ln.split("\t")[0] for ln in participants.read_text().splitlines()[1:] if ln.strip()}
    _atomic_write_text(participants, "participant_id\n" + "\n".join(sorted(rows)) + "\n")
    deriv = {
        "Name": "Simulation ground truth",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "asl_simulator"}],
    }
    _atomic_write_text(out_dir / "derivatives" / "simulation" / "dataset_description.json", _json(deriv))


# ------------------------------------------------------------------------------------- noise stats
def read_bids_asl(asl_path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pair differences (control - label, pairs first), M0 (else the mean control image) and the mean
    control image of one BIDS-ASL series, read with the bundle's own BIDS-ASL reader."""
    asl_path = Path(asl_path)
    items = [i for i in find_asl_series(asl_path.parent) if Path(i["asl"]).name == asl_path.name]
    if not items:
        raise FileNotFoundError(f"{asl_path}: no BIDS-ASL series (with its aslcontext) found")
    series = load_asl_series(items[0])
    m0 = series.m0 if series.m0 is not None else series.control_mean
    return series.pairs, m0, series.control_mean


def _neighbour_correlation(residual: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """Correlation of residuals of adjacent voxels (both in mask) along one spatial axis."""
    n = mask.shape[axis]
    a = [slice(None)] * 3
    b = [slice(None)] * 3
    a[axis], b[axis] = slice(0, n - 1), slice(1, n)
    both = mask[tuple(a)] & mask[tuple(b)]
    ra, rb = residual[(slice(None),) + tuple(a)][:, both], residual[(slice(None),) + tuple(b)][:, both]
    return float(np.sum(ra * rb) / np.sqrt(np.sum(ra**2) * np.sum(rb**2)))


def noise_statistics(diffs: np.ndarray, m0: np.ndarray) -> dict:
    """Pair-to-pair fluctuation statistics of a series of pair differences (pairs, X, Y, Z).

    Residual = pair - mean of pairs, rescaled by sqrt(P / (P - 1)) so its std is the per-pair noise.
    """
    num_pairs = diffs.shape[0]
    mean = diffs.mean(axis=0)
    residual = (diffs - mean) * np.sqrt(num_pairs / (num_pairs - 1))
    head = head_mask(m0)
    background = ~ndimage.binary_dilation(head, iterations=3)
    background &= m0 < 0.05 * np.percentile(m0, 99.5)
    gm = high_perfusion_mask(mean, ndimage.binary_erosion(head, iterations=2))
    levels = diffs[:, gm].mean(axis=1)
    std_in, std_bg = float(residual[:, head].std()), float(residual[:, background].std())
    return {
        "num_pairs": num_pairs,
        "shape": list(diffs.shape[1:]),
        "std_head": std_in,
        "std_background": std_bg,
        "ratio_head_background": std_in / max(std_bg, 1e-12),
        "corr_x_head": _neighbour_correlation(residual, head, 0),
        "corr_y_head": _neighbour_correlation(residual, head, 1),
        "corr_z_head": _neighbour_correlation(residual, head, 2),
        "corr_x_background": _neighbour_correlation(residual, background, 0),
        "corr_y_background": _neighbour_correlation(residual, background, 1),
        "corr_z_background": _neighbour_correlation(residual, background, 2),
        "level_spread_percent": float(100 * levels.std(ddof=1) / abs(levels.mean())),
        "gm_snr_per_pair": float(mean[gm].mean() / std_in),
        "gm_deltam_over_m0_percent": float(100 * mean[gm].mean() / m0[gm].mean()),
    }
