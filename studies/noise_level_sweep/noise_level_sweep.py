"""How the enhancement behaves as the input gets cleaner: simulated series with their noise shrunk.

Usage: python studies/noise_level_sweep/noise_level_sweep.py --dataset_dir data/bench_test \\
    [--model NAME=path/model.pt[:config.json...][:key=value,...] ...] [--k 2 3 4] [--factors 1 0.3 0.1 0] \\
    [--benchmark_json asl_bundle/docs/benchmark/benchmark.json]

Why: a denoiser trained on noisy scans must not blur a clean one; a long, high-SNR acquisition would
otherwise lose grey/white contrast (and CBF accuracy) for nothing. Each series' first k pairs are
averaged, then their noise (and the noise twin's) is shrunk towards the noise-free truth by each factor
f (input = truth + f * noise, the training augmentation of RandNoiseLeveld); the table gives the median
NMSE against the truth inside the brain of the k-pair mean and of each model, each model's median
ratio to the mean (paired per series), and the median over series of the deviation of the grey-matter
(p > 0.7) and white-matter (p > 0.9) median from the truth's, in percent: the bias a smoothing method
puts into regional CBF (same thresholds as asl_bench/check_cbf.py). Model specs as in asl-benchmark
(default: the shipped model). With --benchmark_json, the Gaussian tuned per k on the benchmark's
validation split is added as a reference (its width stays fixed as the noise shrinks).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from asl_enhance.metrics import nmse
from asl_enhance.smoothing import gaussian_smooth
from asl_enhance.transforms import RandNoiseLeveld

import asl_bench.core as bench
from asl_bench.check_cbf import TISSUE_THRESHOLDS


def shrunk(prep: dict, factor: float) -> dict:
    """``prep`` (with its ``truth``) after the training augmentation RandNoiseLeveld at exactly
    ``factor`` (noise and twin scaled alike), re-normalised."""
    if factor == 1.0:
        return prep
    return bench.normalise(RandNoiseLeveld(keys="input_mean", prob=1.0, factor_range=(factor, factor))(prep))


def tissue_masks(series: bench.Series) -> dict[str, np.ndarray]:
    return {t: series.tissues[t] > p for t, p in TISSUE_THRESHOLDS.items()}


def tissue_bias(estimate: np.ndarray, truth: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Percent deviation of each tissue's median from the truth's median."""
    return {t: 100.0 * (np.median(estimate[m]) / np.median(truth[m]) - 1.0) for t, m in masks.items()}


Method = Callable[[dict], np.ndarray]


def tuned_gaussians(path: Path | None) -> dict[int, Method]:
    """Per k, the benchmark's validation-tuned Gaussian (widths in voxels: in-plane, through-plane)."""
    if path is None:
        return {}
    tuned = json.loads(path.read_text())["tuned"]
    out: dict[int, Method] = {}
    for k, entry in tuned.items():
        width = entry["params"]["gaussian"]
        sigma = (width["inplane"], width["inplane"], width["through"])
        out[int(k)] = lambda prep, sigma=sigma: gaussian_smooth(prep["input_mean"], sigma)
    return out


def sweep(series: list[bench.Series], methods: dict[str, Callable[[int], Method | None]], ks, factors) -> list[dict]:
    """Rows of (k, factor, method) with median NMSE, ratio to the k-pair mean and tissue biases."""
    masks = [tissue_masks(s) for s in series]
    rows = []
    for k in ks:
        active = {name: fn for name, make in methods.items() if (fn := make(k)) is not None}
        for factor in factors:
            scores: dict[str, list[tuple[float, dict]]] = {name: [] for name in ("mean_k", *active)}
            for s, tissue in zip(series, masks):
                prep = shrunk(bench.prepare(s, list(range(k))), factor)
                estimates = {"mean_k": prep["input_mean"], **{name: fn(prep) for name, fn in active.items()}}
                for name, estimate in estimates.items():
                    scores[name].append((nmse(estimate, s.truth, s.brain), tissue_bias(estimate, s.truth, tissue)))
            base = np.array([e for e, _ in scores["mean_k"]])
            for name, values in scores.items():
                errors = np.array([e for e, _ in values])
                ratio = np.median(errors / np.maximum(base, 1e-12)) if factor > 0 else np.nan
                row = {
                    "k": k,
                    "factor": factor,
                    "method": name,
                    "nmse": float(np.median(errors)),
                    "ratio_to_mean": float(ratio),
                }
                row.update({f"{t}_bias": float(np.median([b[t] for _, b in values])) for t in ("GM", "WM")})
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, required=True, help="simulated data set (with truth)")
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.0])
    parser.add_argument("--max_series", type=int, default=None)
    parser.add_argument("--benchmark_json", type=Path, default=None, help="add the benchmark's val-tuned Gaussian")
    args = parser.parse_args()
    methods: dict[str, Callable[[int], Method | None]] = {}
    gaussians = tuned_gaussians(args.benchmark_json)
    if gaussians:
        methods["gaussian (val-tuned)"] = gaussians.get
    for model in bench.build_models(args.model):
        methods[model.name] = lambda k, model=model: lambda prep: bench.run_model(model, prep)
    series = bench.load_series(args.dataset_dir, True, args.max_series)
    rows = sweep(series, methods, args.k, args.factors)
    print("| k | noise factor | method | median NMSE vs truth | ratio to the k-pair mean | GM bias % | WM bias % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = "" if np.isnan(r["ratio_to_mean"]) else f"{r['ratio_to_mean']:.2f}"
        print(
            f"| {r['k']} | {r['factor']:g} | {r['method']} | {r['nmse']:.4f} | {ratio} | "
            f"{r['GM_bias']:+.1f} | {r['WM_bias']:+.1f} |"
        )


if __name__ == "__main__":
    main()
