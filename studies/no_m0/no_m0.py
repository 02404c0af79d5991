"""Without M0: does the enhanced map keep the plain mean's level, and how much does the guide help?

For every real series with an M0 (the guide), each disjoint group of k pairs is enhanced four ways:
with its M0 guide, as a deltaM-only series arrives (guide zeros: no M0, no control), and with a flat
guide (the M0's head mask at one level: the guide's shape removed, its presence kept), and with a
guide of ones everywhere (no head either). Scored in the head
mask of the M0 (the same voxels for all three): the output's head mean over the k-pair mean's (level),
its GM-like median over the k-pair mean's, and the noise-corrected NMSE against the unused pairs.

    python studies/no_m0/no_m0.py --data .cache/real/ds000240 --data ../shared/real-asl \
        --model shipped=asl_bundle/models/model.pt --k 2 4 --out studies/no_m0/no_m0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from asl_enhance.metrics import nmse_corrected

from asl_bench import core
from asl_bench.fidelity import load_real, quantile_masks

GUIDES = ("m0", "none", "flat", "ones")


def with_guide(prep: dict, kind: str, head: np.ndarray) -> dict:
    """The prepared input with its guide kept, removed (zeros, source "none") or made flat."""
    if kind == "m0":
        return prep
    if kind == "none":
        return dict(prep, guide=np.zeros_like(prep["guide"]), guide_source="none")
    shape = head if kind == "flat" else np.ones_like(head)
    return dict(prep, guide=shape.astype(np.float32) * 100.0, guide_source=kind)


def scores(estimate: np.ndarray, prep: dict, head: np.ndarray, gm: np.ndarray) -> dict[str, float]:
    mean = prep["input_mean"]
    return {
        "level": float(estimate[head].mean() / mean[head].mean()),
        "gm_median": float(np.median(estimate[gm]) / np.median(mean[gm])),
        "nmse": nmse_corrected(estimate, prep["other_mean"], prep["target_noise_var"], head),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", required=True, help="real BIDS-ASL data sets")
    parser.add_argument("--model", action="append", required=True, help="NAME=weights.pt[:key=value]")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    models = core.build_models(args.model)
    series, _ = load_real(args.data)
    rows = []
    for s in series:
        if s.m0 is None:
            continue
        head = s.brain
        gm, _ = quantile_masks(s.item["pairs"].mean(axis=0), head)
        for k in args.k:
            for g, group in enumerate(core.groups_for(s.num_pairs, k, args.groups)):
                prep = core.prepare(s, group)
                for kind in GUIDES:
                    p = with_guide(prep, kind, head)
                    for m in models:
                        row = {"series": s.name, "k": k, "group": g, "guide": kind, "model": m.name}
                        row.update(scores(core.run_model(m, p), p, head, gm))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    summary = {}
    for m in models:
        for k in args.k:
            for kind in GUIDES:
                sel = [r for r in rows if r["model"] == m.name and r["k"] == k and r["guide"] == kind]
                summary[f"{m.name} k={k} guide={kind}"] = {
                    key: float(np.median([r[key] for r in sel])) for key in ("level", "gm_median", "nmse")
                } | {"level_min": float(min(r["level"] for r in sel)), "inputs": len(sel)}
    for name, values in summary.items():
        print(name, {k: round(v, 3) for k, v in values.items()})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join(["python", *sys.argv]), "summary": summary, "rows": rows}
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
