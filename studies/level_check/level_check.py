"""Does the enhancement keep the perfusion level of a scan unlike the training cohort's?

Usage: python studies/level_check/level_check.py --dataset_dir data/bench_val \\
    [--model NAME=path/model.pt[:config.json...][:key=value,...] ...] [--k 1 2 4] [--factors 0.25 0.5 1 2 4]

Why: deltaM relative to M0 differs between scanners (M0 scaling, readout, PLD, labelling efficiency)
and between subjects (global CBF) far more than inside one simulated cohort. Each series' pairs and
truth are multiplied by a factor c while M0 stays as it is, so SNR, anatomy and texture are unchanged
and only the deltaM/M0 ratio moves. A method that keeps the level returns c times its output at c = 1;
the table gives, per model, k and c, the median over series of the output's level ratio (mean inside
the brain / the scaled truth's mean) and the median NMSE against the scaled truth. Model specs as in
scripts/benchmark.py (default: the shipped model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from asl_enhance.metrics import nmse

import asl_bench.core as bench


def scaled(series: bench.Series, factor: float) -> bench.Series:
    """The series with every pair difference and its truth times ``factor``; M0 unchanged."""
    item = dict(series.item, pairs=series.item["pairs"] * np.float32(factor))
    return bench.Series(series.name, item, series.voxel, series.brain, truth=series.truth * factor)


def check(series: list[bench.Series], models: list[bench.Model], ks, factors) -> list[dict]:
    rows = []
    for model in models:
        for k in ks:
            for factor in factors:
                levels, errors = [], []
                for s in series:
                    if s.num_pairs < k:
                        continue
                    s_c = scaled(s, factor)
                    estimate = bench.run_model(model, bench.prepare(s_c, list(range(k))))
                    levels.append(float(estimate[s.brain].mean() / s_c.truth[s.brain].mean()))
                    errors.append(nmse(estimate, s_c.truth, s.brain))
                rows.append(
                    dict(method=model.name, k=k, factor=factor, level=np.median(levels), nmse=np.median(errors))
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, required=True, help="simulated data set (with truth)")
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--factors", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--max_series", type=int, default=None)
    args = parser.parse_args()
    models = bench.build_models(args.model)
    series = bench.load_series(args.dataset_dir, True, args.max_series)
    rows = check(series, models, args.k, args.factors)
    print("| method | k | deltaM factor (M0 fixed) | median level ratio | median NMSE vs truth |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['k']} | {r['factor']:g} | {r['level']:.3f} | {r['nmse']:.4f} |")


if __name__ == "__main__":
    main()
