"""How much of the no-harm check's tissue shift on real scans is selection, not harm?

The benchmark's no-harm check on real scans (every pair in) draws its GM-like and WM-like masks from percentile
bands of the very map it then compares: voxels picked for a high noisy value regress towards their neighbours
under any smoothing, so even a perfect denoiser shows a GM-like drop. Here each scan's pairs are split in two
halves: the input is the mean of one half (k = N/2), and the tissue medians of the output against the input
are taken on masks drawn (a) from that same input, as the benchmark does, and (b) from the other half, whose
noise is independent. The difference between (a) and (b) is the selection's share.

    python studies/fidelity/noharm_split.py --real .cache/real/ds000240 ../shared/real-asl \\
        --model network=asl_bundle/models/model.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "asl_bundle")]

from asl_bench import core as bench  # noqa: E402
from asl_bench import fidelity as fd  # noqa: E402


def split_halves(num_pairs: int) -> tuple[list[int], list[int]]:
    """Odd and even pairs: the input half and the half the independent masks come from."""
    return list(range(1, num_pairs, 2)), list(range(0, num_pairs, 2))


def changes(series: bench.Series, models: list[bench.Model]) -> dict[str, tuple[float, float, float, float]]:
    """Per method: GM-like and WM-like median change on self-drawn masks, then on independent masks."""
    used, other = split_halves(series.num_pairs)
    prep = bench.prepare(series, used)
    head = series.brain
    pairs = np.asarray(series.item["pairs"], np.float64)
    own = fd.quantile_masks(prep["input_mean"], head)
    independent = fd.quantile_masks(pairs[other].mean(axis=0), head)
    methods = {f"gauss_{w:g}": fd.gaussian_curve_fn(w, series.voxel) for w in (0.5, 0.75, 1.0)}
    methods.update({m.name: (lambda p, m=m: bench.run_model(m, p)) for m in models})
    out = {}
    for name, fn in methods.items():
        output = np.asarray(fn(prep))
        a = fd.no_harm(prep["input_mean"], output, *own)
        b = fd.no_harm(prep["input_mean"], output, *independent)
        out[name] = (a["noharm_gm_change"], a["noharm_wm_change"], b["noharm_gm_change"], b["noharm_wm_change"])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, nargs="+", required=True)
    parser.add_argument("--model", action="append", help="NAME=weights.pt[:key=value,...]")
    args = parser.parse_args(argv)
    models = bench.build_models(args.model)
    series, _ = fd.load_real(args.real)
    rows: dict[str, list[tuple[float, ...]]] = {}
    print("| scan | method | GM / WM change, self-drawn masks | GM / WM change, independent masks |")
    print("|---|---|---|---|")
    for s in series:
        for name, values in changes(s, models).items():
            rows.setdefault(name, []).append(values)
            own, independent = f"{values[0]:+.3f} / {values[1]:+.3f}", f"{values[2]:+.3f} / {values[3]:+.3f}"
            print(f"| {s.name.split('/')[-1]} | {name} | {own} | {independent} |")
    print("\n| method | median GM / WM, self-drawn | within 5% | median GM / WM, independent | within 5% |")
    print("|---|---|---|---|---|")
    for name, values in rows.items():
        v = np.asarray(values)
        ok_a = int(np.sum((np.abs(v[:, 0]) <= fd.NOHARM_TOL) & (np.abs(v[:, 1]) <= fd.NOHARM_TOL)))
        ok_b = int(np.sum((np.abs(v[:, 2]) <= fd.NOHARM_TOL) & (np.abs(v[:, 3]) <= fd.NOHARM_TOL)))
        med = np.median(v, axis=0)
        own, independent = f"{med[0]:+.3f} / {med[1]:+.3f}", f"{med[2]:+.3f} / {med[3]:+.3f}"
        print(f"| {name} | {own} | {ok_a}/{len(v)} | {independent} | {ok_b}/{len(v)} |")


if __name__ == "__main__":
    main()
