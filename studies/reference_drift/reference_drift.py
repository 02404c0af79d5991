"""Does the leave-out reference of a long real run hold the same perfusion as its first pairs?

The real-scan error scores a k-pair group against the mean of every other pair of the run, less that
mean's noise. If perfusion changes over the run (physiology, label efficiency, a drifting baseline), the
group and that reference differ by more than noise: the excess is counted as the method's error, and it
looks like perfusion, so a method that keeps the input's structure is charged for it and a blur is not.

Two measurements on the 8 real runs (ds000240 and ../shared/real-asl):
1. the run's first and second halves' means differ by how many times their noise (pair spread), against
   odd and even pairs (interleaved: the same times), raw and at a 2-voxel Gaussian;
2. on the long runs (>= 40 pairs), the error of the shipped model, the network alone and the Gaussians
   against every other pair (as the benchmark) and against only the ``--window`` pairs nearest in time.

    PYTHONPATH=asl_bundle:. python studies/reference_drift/reference_drift.py \
        --out studies/reference_drift/reference_drift.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from asl_enhance.metrics import nmse_corrected
from scipy.ndimage import gaussian_filter

from asl_bench import core
from asl_bench import fidelity as fd

MODELS = {
    "default (0.11.0)": "network=asl_bundle/models/model.pt",
    "network alone": "no_restore=asl_bundle/models/model.pt:restore_bands=[],restore_sigma=0",
}


def halves_excess(pairs: np.ndarray, brain: np.ndarray, sigma: float) -> dict[str, float]:
    """Energy of the difference of two half-run means over its expected noise energy (1: noise only)."""
    q = np.stack([gaussian_filter(p, sigma) if sigma else p for p in pairs])
    half = len(q) // 2

    def excess(a: list[int], b: list[int]) -> float:
        diff = ((q[a].mean(0) - q[b].mean(0)) ** 2)[brain].mean()
        noise = (q[a].var(0, ddof=1) / len(a) + q[b].var(0, ddof=1) / len(b))[brain].mean()
        return float(diff / noise)

    return {
        "blocked": excess(list(range(half)), list(range(half, 2 * half))),
        "interleaved": excess(list(range(0, 2 * half, 2)), list(range(1, 2 * half, 2))),
    }


def nearest(num_pairs: int, group: list[int], window: int) -> list[int]:
    """The ``window`` pairs outside ``group`` nearest to it in time."""
    centre = np.mean(group)
    rest = [i for i in range(num_pairs) if i not in set(group)]
    return sorted(sorted(rest, key=lambda i: (abs(i - centre), i))[:window])


def references(pairs: np.ndarray, rest: list[int], local: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each reference's mean and the variance of its noise."""
    return {
        name: (pairs[ids].mean(0), pairs[ids].var(0, ddof=1) / len(ids))
        for name, ids in (("all", rest), ("local", local))
    }


def twin_reads(prep: dict, refs: dict, brain: np.ndarray) -> dict[str, float]:
    """The twin's energy over the k-pair mean's noise energy against each reference (1: the twin reads it)."""
    twin2 = float((prep["input_twin"] ** 2)[brain].sum())
    return {
        f"twin_{name}": twin2 / float(((prep["input_mean"] - ref) ** 2 - var)[brain].sum())
        for name, (ref, var) in refs.items()
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--min_pairs", type=int, default=40)
    p.add_argument("--report", action="store_true", help="print the tables of an earlier --out")
    args = p.parse_args()
    if args.report:
        report(json.loads(args.out.read_text()), args.ks)
        return
    models = [core.build_model(spec, core.INFERENCE_CONFIG) for spec in MODELS.values()]
    series = fd.study_series()
    opts = fd.Options()
    result = {"halves": {}, "rows": []}
    for s in series:
        pairs, name = s.item["pairs"], s.name.split("/")[-1]
        result["halves"][name] = {f"sigma{g:g}": halves_excess(pairs, s.brain, g) for g in (0, 2)}
        print(name, len(pairs), flush=True)
        if len(pairs) < args.min_pairs:
            continue
        for k in args.ks:
            for gi, group in enumerate(core.groups_for(s.num_pairs, k, opts.groups)):
                prep = core.prepare(s, group)
                rest = [i for i in range(len(pairs)) if i not in set(group)]
                refs = references(pairs, rest, nearest(len(pairs), group, args.window))
                twin = twin_reads(prep, refs, s.brain)
                outs = {label: core.run_model(m, prep) for label, m in zip(MODELS, models)}
                for width in fd.GAUSS_WIDTHS:
                    outs[f"gauss_{width:g}"] = fd.gaussian_curve_fn(width, s.voxel)(prep)
                outs["mean_k"] = prep["input_mean"]
                for method, out in outs.items():
                    row = {"scan": name, "k": k, "group": gi, "method": method, **twin}
                    row.update({ref: nmse_corrected(out, *refs[ref], s.brain) for ref in refs})
                    result["rows"].append(row)
    args.out.write_text(json.dumps(result, indent=1))
    report(result, args.ks)


def report(result: dict, ks) -> None:
    for name, excess in result["halves"].items():
        cells = " | ".join(f"{s}: {v['blocked']:.2f} / {v['interleaved']:.2f}" for s, v in excess.items())
        print(f"{name}: half-run difference over its noise, blocked / interleaved, {cells}")
    rows = result["rows"]
    for k in ks:
        for scan in dict.fromkeys(r["scan"] for r in rows if r["k"] == k):
            print(f"\n{scan} k = {k}: method | median error vs all other pairs | vs the nearest in time")
            sel = [r for r in rows if r["k"] == k and r["scan"] == scan]
            med = {
                m: (
                    np.median([r["all"] for r in sel if r["method"] == m]),
                    np.median([r["local"] for r in sel if r["method"] == m]),
                )
                for m in dict.fromkeys(r["method"] for r in sel)
            }
            for m, (a, b) in med.items():
                print(f"{m} | {a:.3f} | {b:.3f}")
            gauss = {m: v for m, v in med.items() if m.startswith("gauss_")}
            reads = [(r["twin_all"], r["twin_local"]) for r in sel if r["method"] == "mean_k"]
            print("twin over the input's noise, per group (all / nearest):", [f"{a:.2f} / {b:.2f}" for a, b in reads])
            for i, ref in enumerate(("all", "local")):
                best = min(gauss.items(), key=lambda kv: kv[1][i])
                print(f"{ref}: default / best Gaussian ({best[0]}) = {med['default (0.11.0)'][i] / best[1][i]:.2f}")


if __name__ == "__main__":
    main()
