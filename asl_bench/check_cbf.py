"""Check the bundle's CBF against the white-paper CBF computed by hand from the simulator's noise-free deltaM.

Usage: asl-check-cbf --dataset_dir DATA --output_dir OUT (after running inference on DATA into OUT).

Why: the quantification reads its parameters from the BIDS sidecars; this script instead takes them
from the simulator's own record (derivatives/simulation/.../*_desc-truth_deltam.json) and writes the
white-paper equations out again, so a sidecar-parsing or unit error in the bundle shows up as a
disagreement. Medians are over GM (p > 0.7) and WM (p > 0.9) voxels where the bundle wrote CBF.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from asl_enhance.quantification import GM_THRESHOLD, WM_THRESHOLD

#: tissue masks of the regional medians: probability above the bundle's own thresholds
TISSUE_THRESHOLDS = {"GM": GM_THRESHOLD, "WM": WM_THRESHOLD}


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def hand_cbf(truth_deltam: np.ndarray, m0: np.ndarray, acq: dict) -> np.ndarray:
    """White-paper CBF, written out here independently of asl_enhance.physics."""
    t1b = 1.65 if acq["field_strength"] > 2.0 else 1.35
    t1gm = 1.3 if acq["field_strength"] > 2.0 else 1.1
    alpha = acq["labeling_efficiency"] * 0.95 ** acq["bs_pulses"]
    pld = acq["pld"] + np.arange(truth_deltam.shape[2]) * acq["slice_time"]  # per slice (0 for 3D)
    m0_eq = m0 / (1.0 - np.exp(-acq["m0_repetition_time"] / t1gm))
    with np.errstate(divide="ignore", invalid="ignore"):
        if acq["labeling_type"] == "PASL":
            return 6000 * 0.9 * truth_deltam * np.exp(pld / t1b) / (2 * alpha * acq["labeling_duration"] * m0_eq)
        tau = acq["labeling_duration"]
        return 6000 * 0.9 * truth_deltam * np.exp(pld / t1b) / (2 * alpha * t1b * m0_eq * (1 - np.exp(-tau / t1b)))


def series_m0(perf: Path, sub: str, acq: dict) -> np.ndarray:
    """The series' M0 (mean of included m0scan volumes, or the separate M0 image)."""
    if acq["m0_type"] == "Separate":
        return load(perf / f"{sub}_m0scan.nii.gz")
    data = load(perf / f"{sub}_asl.nii.gz")
    return data[..., : acq["num_m0"]].mean(axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args()
    worst = 0.0
    print(
        f"{'series':8} {'type':6} {'B0':>4} {'ro':>3} {'M0':>9} {'tissue':>6} {'hand':>7} "
        f"{'mean':>7} {'dev%':>6} {'enh':>7} {'dev%':>6}"
    )
    for truth_json in sorted((args.dataset_dir / "derivatives" / "simulation").rglob("*_desc-truth_deltam.json")):
        sub = truth_json.name.split("_")[0]
        acq = json.loads(truth_json.read_text())["acquisition"]
        sim, perf = truth_json.parent, args.dataset_dir / sub / "perf"
        out = args.output_dir / sub / "perf"
        if not (out / f"{sub}_desc-mean_cbf.nii.gz").exists():
            print(f"{sub}: no CBF output")
            continue
        reference = hand_cbf(load(sim / f"{sub}_desc-truth_deltam.nii.gz"), series_m0(perf, sub, acq), acq)
        maps = {d: load(out / f"{sub}_desc-{d}_cbf.nii.gz") for d in ("mean", "enhanced")}
        for tissue, threshold in TISSUE_THRESHOLDS.items():
            mask = (load(sim / f"{sub}_label-{tissue}_probseg.nii.gz") > threshold) & (maps["mean"] != 0)
            ref = float(np.median(reference[mask]))
            values = {d: float(np.median(m[mask])) for d, m in maps.items()}
            dev = {d: 100 * (v - ref) / ref for d, v in values.items()}
            worst = max(worst, *(abs(v) for v in dev.values()))
            print(
                f"{sub:8} {acq['labeling_type']:6} {acq['field_strength']:>4g} {acq['readout']:>3} "
                f"{acq['m0_type']:>9} {tissue:>6} {ref:7.2f} {values['mean']:7.2f} {dev['mean']:6.1f} "
                f"{values['enhanced']:7.2f} {dev['enhanced']:6.1f}"
            )
    print(f"largest deviation of a median: {worst:.1f}%")


if __name__ == "__main__":
    main()
