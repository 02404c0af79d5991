"""Held-out comparison of fine-tuned weights against the shipped ones, from gated.py row files.

Each fold's rows are scored on that fold's held-out scans only; the shipped weights' rows come from an
earlier gated.py run over all 8 scans (same lesions, groups and seeds). Prints, per k and method, the
medians over inputs and the per-scan count at or below the scan's best Gaussian.

    python studies/real_n2n/compare.py --shipped studies/noise_gated_restore/band_test.json \
        --shipped studies/noise_gated_restore/scan_floor.json \
        --fold prisma=runs/real_n2n/gated_prisma.json --fold other=runs/real_n2n/gated_other.json
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

#: held-out scans per fold; "all" for weights trained on no real scan
HELD_OUT = {"prisma": "prisma", "other": ("ds000240", "oxfordmpld"), "all": ""}
METHODS = ["none", "0.8.0 + scan floor 1 (0.9.0)"]
COLUMNS = ["nmse", "cr_hypo_r5", "cr_hypo_r2.5", "cr_hyper_r3.5", "removed", "gm_wm"]


def held_out(scan: str, fold: str) -> bool:
    keys = HELD_OUT[fold]
    return any(key in scan for key in ((keys,) if isinstance(keys, str) else keys))


@functools.cache
def read_rows(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(Path(path).read_text()))


def all_rows(paths: str | Path | list) -> list[dict]:
    """Every row of one or more gated.py files (a list, or one string joined by commas); each file read once."""
    names = paths if isinstance(paths, list) else str(paths).split(",")
    return [r for name in names for r in read_rows(str(name))]


def rows_of(paths: str | Path | list, fold: str | None) -> list[dict]:
    """Rows on a fold's held-out real scans, one per input and method (a later file's row wins)."""
    merged = {}
    for r in all_rows(paths):
        if r["group"] not in ("all", "sim") and (fold is None or held_out(r["scan"], fold)):
            merged[(r["scan"], r["k"], r["group"], r["method"])] = r
    return list(merged.values())


def sim_medians(paths: str | Path | list, method: str, k: int) -> float:
    """Median NMSE against the truth over the simulated test subjects (gated.py --sim_dir rows)."""
    values = [r["nmse"] for r in all_rows(paths) if r["group"] == "sim" and r["method"] == method and r["k"] == k]
    return float(np.median(values)) if values else float("nan")


def per_scan(rows: list[dict], method: str, k: int) -> dict[str, float]:
    by = defaultdict(list)
    for r in rows:
        if r["method"] == method and r["k"] == k:
            by[r["scan"]].append(r["nmse"])
    return {s: float(np.median(v)) for s, v in by.items()}


def best_blur(rows: list[dict], k: int) -> dict[str, float]:
    widths = {r["method"] for r in rows if r["method"].startswith("gauss_")}
    curves = [per_scan(rows, w, k) for w in widths]
    return {s: min(c[s] for c in curves) for s in curves[0]}


def summary(rows: list[dict], method: str, k: int) -> dict[str, float]:
    sel = [r for r in rows if r["method"] == method and r["k"] == k]
    out = {c: float(np.nanmedian([r[c] for r in sel])) for c in COLUMNS}
    blur, mine = best_blur(rows, k), per_scan(rows, method, k)
    out["at_or_below_blur"] = sum(mine[s] <= blur[s] for s in mine)
    out["scans"] = len(mine)
    out["geo_ratio_to_blur"] = float(np.exp(np.mean([np.log(mine[s] / blur[s]) for s in mine])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shipped", action="append", required=True, help="rows of the shipped weights (repeatable)")
    ap.add_argument("--fold", action="append", required=True, help="FOLD=rows.json[,more.json] (prisma, other, all)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--label", default="fine-tuned", help="name of the --fold weights in the tables")
    ap.add_argument("--sim", action="store_true", help="also print simulated test medians (rows with --sim_dir)")
    args = ap.parse_args()
    folds = dict(f.split("=", 1) for f in args.fold)
    head = ["k", "weights", "method", "NMSE", "CR hypo r5", "CR hypo r2.5", "CR hyper", "removed", "GM/WM"]
    print("| " + " | ".join(head + ["<= best blur", "NMSE / best blur (geo)"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        for label in ("shipped", args.label):
            pooled = [r for f in folds for r in rows_of(args.shipped if label == "shipped" else folds[f], f)]
            for m in args.methods:
                s = summary(pooled, m, k)
                cells = " | ".join(f"{s[c]:.3f}" for c in COLUMNS)
                count = f"{s['at_or_below_blur']}/{s['scans']}"
                print(f"| {k} | {label} | {m} | {cells} | {count} | {s['geo_ratio_to_blur']:.3f} |")
        for f in folds:
            m = args.methods[min(1, len(args.methods) - 1)]
            ship, tuned = per_scan(rows_of(args.shipped, f), m, k), per_scan(rows_of(folds[f], f), m, k)
            blur = best_blur(rows_of(args.shipped, f), k)
            for s in sorted(ship):
                name = s.split("/")[1]
                print(f"k={k} {f} {name}: shipped {ship[s]:.4f} {args.label} {tuned[s]:.4f} best blur {blur[s]:.4f}")

    if args.sim:
        for k in args.ks:
            for m in args.methods:
                shipped = sim_medians(args.shipped, m, k)
                tuned = sim_medians([p for f in folds.values() for p in f.split(",")], m, k)
                print(f"simulated k={k} {m}: shipped {shipped:.4f} {args.label} {tuned:.4f}")


if __name__ == "__main__":
    main()
