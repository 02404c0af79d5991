"""How well does a spatial high-pass of ONE pair difference estimate that pair's noise level?

At k = 1 there is no noise twin, so the noise bound has nothing to measure the noise with. This
study compares, inside the head, the RMS of a pair's true noise (simulated: pair - truth; real:
pair - mean of the other pairs, corrected for that reference's own noise) with the RMS of the
pair's high-pass residual (pair - Gaussian blur of it), series by series, and prints the ratio's
spread: a stable ratio makes ``ratio * local high-pass RMS`` a usable single-pair noise estimate.

Usage: python studies/single_pair_noise/single_pair_noise.py --sim_dir data/bench_val \
    --real_dir .cache/real/ds000240 [--real_dir /path/to/real-asl ...] [--out studies/single_pair_noise/result.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from asl_enhance.smoothing import gaussian_smooth

import asl_bench.core as bench

#: high-pass: the pair minus its blur at this width (voxels; in-plane, in-plane, through-plane)
HIGHPASS_SIGMA = (1.0, 1.0, 0.5)
#: pairs per series scored
MAX_PAIRS = 8


def ratio_for_pair(pair: np.ndarray, noise_var: np.ndarray | float, mask: np.ndarray) -> float:
    """sqrt(mean true noise variance / mean high-pass energy) inside ``mask``."""
    highpass = pair - gaussian_smooth(pair, HIGHPASS_SIGMA)
    return float(
        np.sqrt(
            np.mean(np.asarray(noise_var)[mask] if np.ndim(noise_var) else noise_var) / np.mean(highpass[mask] ** 2)
        )
    )


def series_ratios(series: bench.Series, simulated: bool) -> list[float]:
    pairs = np.asarray(series.item["pairs"], np.float64)
    head = bench.normalise(bench.prepare(series, [0]))["mask"][0] > 0
    mask = series.brain if simulated else head
    ratios = []
    for i in range(min(MAX_PAIRS, pairs.shape[0])):
        if simulated:
            noise_var = (pairs[i] - series.truth) ** 2
        else:
            others = np.delete(pairs, i, axis=0)
            n = others.shape[0]
            # E[(p - ref)^2] = s^2 (1 + 1/n) for independent pairs of variance s^2
            noise_var = (pairs[i] - others.mean(axis=0)) ** 2 / (1.0 + 1.0 / n)
        ratios.append(ratio_for_pair(pairs[i].astype(np.float32), noise_var, mask))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sim_dir", type=Path, required=True)
    parser.add_argument("--real_dir", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for s in bench.load_series(args.sim_dir, True, None):
        r = series_ratios(s, True)
        rows.append({"set": "simulated", "series": s.name, "median": float(np.median(r)), "ratios": r})
    for real in args.real_dir:
        for s in bench.load_series(real, False, None):
            if s.num_pairs < 4:
                continue
            r = series_ratios(s, False)
            rows.append({"set": str(real), "series": s.name, "median": float(np.median(r)), "ratios": r})
    for row in rows:
        print(f"{row['set'][-24:]:>24} {row['series'][:40]:40} ratio {row['median']:.3f}")
    for name in sorted({r["set"] for r in rows}):
        med = [r["median"] for r in rows if r["set"] == name]
        print(f"{name}: median {np.median(med):.3f}, range {min(med):.3f}-{max(med):.3f} over {len(med)} series")
    if args.out:
        args.out.write_text(json.dumps({"highpass_sigma": HIGHPASS_SIGMA, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
