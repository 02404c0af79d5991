"""``asl-benchmark``: the ASL bundle against averaging and classical denoisers.

Usage (from the repository root):
    asl-benchmark --val_dir data/bench_val --test_dir data/bench_test \\
        [--real_dir .cache/real/ds000240] [--model NAME=path/model.pt[:config.json...][:key=value,...] ...] \\
        [--k 1 2 3 4] [--out_dir asl_bundle/docs/benchmark] [--quick]

For k input pairs it compares, on held-out simulated subjects (noise-free truth) and on a real scan
(noise-corrected error against the pairs not used): the k-pair mean; Gaussian smoothing, non-local
means, BM3D and an M0-guided filter, each tuned per k on the simulated validation split; the Gaussian
whose width is chosen per scan from its own pairs (self-tuned) and the Gaussian at the width best for
each test set (oracle, an upper bound); the mean of all pairs with and without the best classical
denoiser (today's full scan); and the bundle's network(s), run through the bundle's own transforms.

Masks: simulated scores are inside the brain (truth GM + WM + CSF probability > 0.5); the real scan
has no segmentation, so its scores are inside the head mask of the bundle's normalisation (guide above
20 % of its 99th percentile). Lesion CBF error: both the estimate and the noise-free deltaM are
quantified with the bundle's white-paper quantification (same M0 and sidecar); the error is the mean
absolute difference inside the lesion mask, in ml/100 g/min.

Outputs in --out_dir: benchmark.csv (one row per series, k, pair group and method),
benchmark_summary.csv (medians), benchmark.png (k = 2), benchmark.json (tuned parameters, command,
versions). A markdown summary and one line per target go to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import classical as cd
from .core import (
    BUNDLE,
    MAX_REAL_GROUPS,
    SLOW_GROUPS,
    SLOW_SERIES,
    TUNE_SERIES,
    TUNE_SLICES,
    Run,
    build_models,
    evaluate_full_scan,
    evaluate_set,
    figure,
    load_series,
    markdown,
    pivot,
    summarise,
    targets,
    time_model,
    tune_all,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val_dir", type=Path, required=True, help="simulated tuning split (with truth)")
    p.add_argument("--test_dir", type=Path, required=True, help="simulated held-out split (with truth)")
    p.add_argument("--real_dir", type=Path, default=None, help="real BIDS-ASL data set (e.g. .cache/real/ds000240)")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="NAME=weights.pt[:config.json...][:key=value,...] (repeatable; default: the shipped model)",
    )
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--out_dir", type=Path, default=BUNDLE / "docs" / "benchmark")
    p.add_argument("--max_series", type=int, default=None, help="cap on series per simulated data set")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 series per set, k = 2, small grids")
    return p.parse_args(argv)


def grids_for(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "gaussian": ((0.0, 1.0, 2.0), (0.0, 1.0)),
            "guided": cd.guided_grid()[::5],
            "nlm": cd.nlm_grid()[2:3],
            "bm3d": cd.bm3d_grid()[1:2],
        }
    return {
        "gaussian": (cd.GAUSS_INPLANE, cd.GAUSS_THROUGH),
        "guided": cd.guided_grid(),
        "nlm": cd.nlm_grid(),
        "bm3d": cd.bm3d_grid(),
    }


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import monai
    import skimage

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "scikit-image": skimage.__version__,
        "bm3d": version("bm3d"),
        "torch_threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    ks = [2] if args.quick else sorted(set(args.k))
    limit = 2 if args.quick else args.max_series
    grids = grids_for(args.quick)
    gauss_grid = cd.gaussian_grid(*grids["gaussian"])
    models = build_models(args.model)
    timings = {
        m.name: {"x".join(map(str, shp)): time_model(m, shp) for shp in ((64, 64, 20), (96, 96, 48))} for m in models
    }
    log(f"network timings (s/volume, CPU, {torch.get_num_threads()} threads): {timings}")

    val = load_series(args.val_dir, True, limit)
    test = load_series(args.test_dir, True, limit)
    real = load_series(args.real_dir, False, 1) if args.real_dir else []
    log(f"loaded {len(val)} val, {len(test)} test, {len(real)} real series")
    full_n = sorted({s.num_pairs for s in test})
    tuned = tune_all(val, sorted(set(ks) | set(full_n)), grids, log)

    run = Run()
    evaluate_set("test", test, ks, tuned, models, gauss_grid, False, run, log)
    evaluate_full_scan("test", test, tuned, run, log)
    if real:
        evaluate_set("real", real, ks, tuned, models, gauss_grid, True, run, log)
    summary = summarise(run.rows, tuned)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "benchmark.csv", run.rows)
    write_csv(args.out_dir / "benchmark_summary.csv", summary)
    figure(run, args.out_dir / "benchmark.png", models, tuned)
    verdicts = targets(run.rows, summary, tuned, models, timings)
    elapsed = time.perf_counter() - start
    meta = {
        "command": " ".join(["asl-benchmark", *(argv if argv is not None else sys.argv[1:])]),
        "elapsed_s": round(elapsed, 1),
        "versions": versions(),
        "load_average": os.getloadavg(),
        "network_timings_s": timings,
        "tuned": {str(k): v for k, v in tuned.items()},
        "oracle_gaussian": run.oracle,
        "targets": verdicts,
        "caps": {
            "tune_slices": TUNE_SLICES,
            "tune_series": TUNE_SERIES,
            "slow_series": SLOW_SERIES,
            "slow_real_groups": SLOW_GROUPS,
            "max_real_groups": MAX_REAL_GROUPS,
            "max_series": limit,
        },
        "masks": {"simulated": "truth GM+WM+CSF probseg > 0.5", "real": "head mask of NormalizeASLd"},
        "lesion_cbf": "white-paper CBF (bundle quantification) of estimate vs of noise-free deltaM, mean abs in lesion",
        "models": [m.spec for m in models],
    }
    (args.out_dir / "benchmark.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print(pivot(summary))
    print()
    print(markdown(summary, k_show=2 if 2 in ks else None))
    print()
    print("\n".join(verdicts))
    print(
        f"\nwrote {args.out_dir}/benchmark.csv, benchmark_summary.csv, benchmark.png, benchmark.json in {elapsed:.0f} s"
    )


if __name__ == "__main__":
    main()
