"""The quickstart's maps against the simulator's noise-free truth: error and grey/white contrast.

The QC figure compares the enhanced map with the all-pair mean, which is not the truth either (8 pairs of
noise, and the simulator's subtraction artefacts at the head's edge). For each quickstart subject this prints,
inside the brain (GM + WM probability > 0.5), the NMSE against the truth deltaM, the GM/WM ratio (mean
deltaM where GM > 0.7 over where WM > 0.7) over the truth's and the GM mean over the truth's, for the 2-pair
mean, the enhanced map, the all-pair mean and Gaussians of the 2-pair mean (voxels in-plane, half through-plane).

    bash scripts/quickstart.sh
    python studies/quickstart_truth/quickstart_truth.py --data data/default --outputs outputs/default
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

WIDTHS = (0.75, 1.0, 1.25, 1.5, 2.0)


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def all_pair_mean(asl: Path) -> np.ndarray:
    """Mean control - label over every pair of the raw series (aslcontext order)."""
    types = asl.with_name(asl.name.replace("_asl.nii.gz", "_aslcontext.tsv")).read_text().split()[1:]
    data = load(asl)
    control = [i for i, t in enumerate(types) if t == "control"]
    label = [i for i, t in enumerate(types) if t == "label"]
    return (data[..., control] - data[..., label]).mean(axis=-1)


def scores(estimate: np.ndarray, truth: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> tuple[float, float, float]:
    """(NMSE in the brain, GM/WM ratio over the truth's, GM mean over the truth's)."""
    brain = (gm + wm) > 0.5
    nmse = float(np.sum((estimate - truth)[brain] ** 2) / np.sum(truth[brain] ** 2))

    def ratio(x: np.ndarray) -> float:
        return float(x[gm > 0.7].mean() / x[wm > 0.7].mean())

    grey = gm > 0.7
    return nmse, ratio(estimate) / ratio(truth), float(estimate[grey].mean() / truth[grey].mean())


def subject_rows(data: Path, outputs: Path, subject: str) -> list[tuple[str, float, float, float]]:
    truth_dir = data / "derivatives" / "simulation" / subject / "perf"
    truth = load(truth_dir / f"{subject}_desc-truth_deltam.nii.gz")
    gm = load(truth_dir / f"{subject}_label-GM_probseg.nii.gz")
    wm = load(truth_dir / f"{subject}_label-WM_probseg.nii.gz")
    out = outputs / subject / "perf"
    mean = load(out / f"{subject}_desc-mean_deltam.nii.gz")
    maps = {
        "2-pair mean": mean,
        "enhanced": load(out / f"{subject}_desc-enhanced_deltam.nii.gz"),
        "all-pair mean": all_pair_mean(data / subject / "perf" / f"{subject}_asl.nii.gz"),
    }
    maps.update({f"Gaussian {w:g}": gaussian_filter(mean, (w, w, w / 2)) for w in WIDTHS})
    return [(name, *scores(x, truth, gm, wm)) for name, x in maps.items()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/default"))
    parser.add_argument("--outputs", type=Path, default=Path("outputs/default"))
    args = parser.parse_args(argv)
    print("| subject | map | NMSE vs truth | GM/WM ratio / truth's | GM mean / truth's |")
    print("|---|---|---|---|---|")
    for subject in sorted(p.name for p in args.outputs.glob("sub-*") if p.is_dir()):
        for name, nmse, ratio, grey in subject_rows(args.data, args.outputs, subject):
            print(f"| {subject} | {name} | {nmse:.3f} | {ratio:.2f} | {grey:.3f} |")


if __name__ == "__main__":
    main()
