"""``asl-benchmark``: the ASL bundle against averaging and classical denoisers.

Usage (from the repository root):
    asl-benchmark --val_dir data/bench_val --test_dir data/bench_test \\
        [--real_dir .cache/real/ds000240] [--model NAME=path/model.pt[:config.json...][:key=value,...] ...] \\
        [--k 1 2 3 4] [--out_dir asl_bundle/docs/benchmark] [--quick] \\
        [--fidelity | --fidelity_only] [--fidelity_dir DIR ...] [--fidelity_k 1 2 4] [--fidelity_skip_slow]

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

Fidelity (issue 17; :mod:`asl_bench.fidelity` says what each measure is): ``--fidelity`` adds, for every
method and for the Gaussian at several widths, at ``--fidelity_k`` (1 2 4), the contrast recovery of
lesions planted into real long scans (the --real_dir scan and every series of each ``--fidelity_dir``
BIDS-ASL set; multi-PLD runs: their longest-PLD block) and of the simulated test subjects' lesions, the
structure removed, the GM/WM ratio against the reference's, the error, no-harm checks (every pair as
input, a clean input) and a perfusion-free series. Its rows (data sets fidelity_real, fidelity_sim,
noharm_real, noharm_sim, clean_sim) and columns go into benchmark.csv and benchmark_summary.csv (the
benchmark's own rows and columns are unchanged) and into fidelity.csv, fidelity_summary.csv,
fidelity.json and fidelity_tables.md; fidelity.png plots error against lesion contrast recovery.
``--fidelity_only`` runs the tuning and the fidelity part alone (no benchmark files);
``--fidelity_skip_slow`` leaves NLM and BM3D out of it. Example (studies/fidelity ran this with
``--fidelity_only`` and five models):
    asl-benchmark --val_dir data/bench_val --test_dir data/bench_test --real_dir .cache/real/ds000240 \\
        --fidelity_dir ../shared/real-asl --fidelity --out_dir studies/fidelity \\
        --model network=asl_bundle/models/model.pt --model bound0=asl_bundle/models/model.pt:noise_bound=0
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
from . import fidelity as fd
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
    f = p.add_argument_group("fidelity (issue 17)")
    f.add_argument("--fidelity", action="store_true", help="add the fidelity rows, columns and fidelity.png")
    f.add_argument("--fidelity_only", action="store_true", help="tune, then the fidelity part alone")
    f.add_argument(
        "--fidelity_dir",
        type=Path,
        action="append",
        default=None,
        help="real BIDS-ASL data set for lesion planting, besides --real_dir (repeatable; every series with "
        f">= {fd.MIN_PAIRS} pairs; multi-PLD: the longest-PLD block)",
    )
    f.add_argument("--fidelity_k", type=int, nargs="+", default=[1, 2, 4])
    f.add_argument("--fidelity_groups", type=int, default=fd.GROUPS, help="pair groups per real series and k")
    f.add_argument("--fidelity_lesions", type=int, default=fd.PER_TYPE, help="lesions of each type per input")
    f.add_argument("--fidelity_sim_series", type=int, default=None, help="cap on simulated test subjects")
    f.add_argument(
        "--fidelity_check_series",
        type=int,
        default=fd.CHECK_SERIES,
        help="simulated subjects for the no-harm, clean-input and perfusion-free checks",
    )
    f.add_argument("--fidelity_skip_slow", action="store_true", help="no NLM or BM3D in the fidelity part")
    args = p.parse_args(argv)
    if args.fidelity and args.fidelity_only:
        p.error("--fidelity and --fidelity_only: choose one")
    return args


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
    """Every column any row has, in order of first appearance; a row without one leaves it empty."""
    fieldnames = list(dict.fromkeys(key for r in rows for key in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
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
    fidelity = args.fidelity or args.fidelity_only
    fid_ks = [2] if args.quick else sorted(set(args.fidelity_k))
    timings = {}
    if not args.fidelity_only:
        timings = {
            m.name: {"x".join(map(str, shp)): time_model(m, shp) for shp in ((64, 64, 20), (96, 96, 48))}
            for m in models
        }
        log(f"network timings (s/volume, CPU, {torch.get_num_threads()} threads): {timings}")

    val = load_series(args.val_dir, True, limit)
    test = load_series(args.test_dir, True, limit)
    real = load_series(args.real_dir, False, 1) if args.real_dir else []
    log(f"loaded {len(val)} val, {len(test)} test, {len(real)} real series")
    full_n = sorted({s.num_pairs for s in test})
    tune_ks = set(fid_ks) if args.fidelity_only else set(ks) | (set(fid_ks) if fidelity else set())
    tuned = tune_all(val, sorted(tune_ks | set(full_n)), grids, log)

    run = Run()
    if not args.fidelity_only:
        evaluate_set("test", test, ks, tuned, models, gauss_grid, False, run, log)
        evaluate_full_scan("test", test, tuned, run, log)
        if real:
            evaluate_set("real", real, ks, tuned, models, gauss_grid, True, run, log)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fid_meta: dict[str, Any] = {}
    if fidelity:
        fid_meta = run_fidelity(args, real, test, tuned, models, fid_ks, run, log)
    summary = summarise(run.rows, tuned)
    if fidelity:
        fid_sets = {r["dataset"] for r in run.rows[fid_meta.pop("first_row") :]}
        write_csv(args.out_dir / "fidelity_summary.csv", [r for r in summary if r["dataset"] in fid_sets])
    if args.fidelity_only:
        fid_meta.update(
            command=" ".join(["asl-benchmark", *(argv if argv is not None else sys.argv[1:])]),
            elapsed_s=round(time.perf_counter() - start, 1),
            versions=versions(),
            load_average=os.getloadavg(),
            tuned={str(k): v for k, v in tuned.items()},
            models=[m.spec for m in models],
        )
        (args.out_dir / "fidelity.json").write_text(json.dumps(fid_meta, indent=2, default=str) + "\n")
        print(fid_meta["tables"])
        print(
            f"\nwrote {args.out_dir}/fidelity.csv, fidelity_summary.csv, fidelity.png, fidelity.json in "
            f"{time.perf_counter() - start:.0f} s"
        )
        return
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
    if fidelity:
        meta["fidelity"] = fid_meta
        (args.out_dir / "fidelity.json").write_text(
            json.dumps(dict(fid_meta, command=meta["command"], elapsed_s=meta["elapsed_s"]), indent=2, default=str)
            + "\n"
        )
    (args.out_dir / "benchmark.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print(pivot(summary))
    print()
    print(markdown(summary, k_show=2 if 2 in ks else None))
    print()
    print("\n".join(verdicts))
    if fidelity:
        print("\n" + fid_meta["tables"])
    print(
        f"\nwrote {args.out_dir}/benchmark.csv, benchmark_summary.csv, benchmark.png, benchmark.json in {elapsed:.0f} s"
    )


def run_fidelity(args, real, test, tuned, models, ks, run: Run, log) -> dict[str, Any]:
    """The fidelity part: rows appended to ``run``, fidelity.csv, fidelity.png, fidelity_tables.md;
    returns what the JSON records (``first_row``: where its rows start in ``run.rows``)."""
    fid_start = time.perf_counter()
    extra, notes = fd.load_real(args.fidelity_dir or [])
    fid_real = (fd.named(real, args.real_dir.name) if real else []) + extra
    if args.quick:
        fid_real = fid_real[:2]
    log(f"fidelity: {len(fid_real)} real series: {[s.name for s in fid_real]}")
    opts = fd.Options(
        ks=ks,
        groups=1 if args.quick else args.fidelity_groups,
        per_type=1 if args.quick else args.fidelity_lesions,
        sim_series=args.fidelity_sim_series,
        check_series=1 if args.quick else args.fidelity_check_series,
        slow=not args.fidelity_skip_slow,
    )
    first = len(run.rows)
    meta = fd.evaluate(fid_real, test, tuned, models, opts, run, log)
    rows = run.rows[first:]
    write_csv(args.out_dir / "fidelity.csv", rows)
    names = [m.name for m in models]
    fd.figure(rows, args.out_dir / "fidelity.png", ks, names)
    meta["tables"] = fd.tables(rows, ks, names)
    (args.out_dir / "fidelity_tables.md").write_text(meta["tables"] + "\n")
    meta.update(
        first_row=first,
        real_series=[s.name for s in fid_real],
        real_notes=notes,
        simulated_series=[s.name for s in test[: opts.sim_series]],
        fidelity_seconds=round(time.perf_counter() - fid_start, 1),
    )
    log(f"fidelity part done in {time.perf_counter() - fid_start:.0f}s")
    return meta


if __name__ == "__main__":
    main()
