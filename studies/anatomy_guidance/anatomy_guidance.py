"""How much of deltaM the anatomy explains, in the simulator and on the real scan (model card, Results).

A local regression (``classical_denoisers.local_regression``) of the k-pair mean on guide images
keeps every edge of its regressors and smooths only their local weights. Regressor sets:
- ``gaussian``: a constant (the Gaussian blur, the reference);
- ``m0``: M0 and a constant;
- ``m0_control``: M0, the mean control image of the k input pairs and a constant (what a user has);
- ``tissue_oracle`` (simulated only): the true GM, WM and CSF partial-volume maps;
- ``tissue_lesion_oracle`` (simulated only): the same with GM and WM split at the true lesion edge.
Widths (in-plane, through-plane sigma in voxels) are tuned per k on the simulated validation split
(geometric-mean NMSE against the truth) and applied to the simulated test split (NMSE against the
truth) and the real scan (noise-corrected NMSE against the pairs not used, 10 disjoint groups); on
the real scan the width best for the scan (an oracle, like the benchmark's ``gaussian_oracle``) is
reported too. If the simulator's deltaM followed the anatomy no more closely than a real scan's,
a regressor set would gain over the blur by about as much on both.

The same question for networks (``--model``, default the shipped weights): each is run with its
guide (M0 where the series has one) and with that guide blurred (``GUIDE_BLUR`` voxels), which keeps
its level and removes its tissue edges; what a network loses then is what it takes from the anatomy.

Usage: python studies/anatomy_guidance/anatomy_guidance.py --val_dir data/bench_val --test_dir data/bench_test \
           --real_dir .cache/real/ds000240 [--k 2 4] [--model NAME=weights.pt[:...] ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from asl_enhance.bids import load_nifti, read_aslcontext
from asl_enhance.bids import mean_control as mean_control_of
from scipy import ndimage

import asl_bench.classical as cd
import asl_bench.core as bench

SETS = ("gaussian", "m0", "m0_control", "tissue_oracle", "tissue_lesion_oracle")
ORACLE_SETS = ("tissue_oracle", "tissue_lesion_oracle")
#: (in-plane, through-plane) sigma grid in voxels; tissue regressors carry the edges, so wide widths pay
KEYS = ("sim_test", "real", "real_oracle")
#: sigma (voxels, x y z) of the blur that removes the guide's tissue edges in the network ablation
GUIDE_BLUR = (3.0, 3.0, 1.5)
GRID = [(a, b) for a in (0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0) for b in (0.5, 1.0, 2.0, 4.0)]


def mean_control(series: bench.Series, group: list[int]) -> np.ndarray:
    """Mean of the control volumes of the pairs in ``group`` (a short scan's own structural image)."""
    pair_volumes = series.item["pair_volumes"]
    pair_volumes = json.loads(pair_volumes) if isinstance(pair_volumes, str) else pair_volumes
    data = series.extra.get("asl_data")
    if data is None:
        data = series.extra["asl_data"] = load_nifti(series.item["asl"])[0]
    return mean_control_of(data, read_aslcontext(series.item["aslcontext"]), [pair_volumes[i] for i in group])


def unit(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``volume`` divided by its mean inside ``mask`` (regressor scale does not change the fit;
    this only keeps the ridge comparable across images)."""
    return (volume / max(float(np.mean(volume[mask])), 1e-12)).astype(np.float64)


def regressors(series: bench.Series, group: list[int], head: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Every regressor set that this series supports."""
    one = np.ones(series.item["guide"].shape)
    control = unit(mean_control(series, group), head)
    out: dict[str, list[np.ndarray]] = {"gaussian": [one]}
    if series.item["guide_source"] == "m0":
        m0 = unit(series.item["guide"], head)
        out |= {"m0": [m0, one], "m0_control": [m0, control, one]}
    if series.tissues:
        gm, wm, csf = (series.tissues[t].astype(np.float64) for t in ("GM", "WM", "CSF"))
        lesion = series.lesion.astype(np.float64)
        out["tissue_oracle"] = [gm, wm, csf]
        out["tissue_lesion_oracle"] = [gm * (1 - lesion), wm * (1 - lesion), csf, gm * lesion, wm * lesion]
    return out


def cases(series: list[bench.Series], k: int, max_groups: int) -> list[tuple[bench.Series, dict, dict]]:
    """(series, prepared input, regressor sets) for every input of k pairs."""
    out = []
    for s in series:
        for group in bench.groups_for(s.num_pairs, k, max_groups):
            prep = bench.prepare(s, group)
            out.append((s, prep, regressors(s, group, prep["mask"][0] > 0.5)))
    return out


def errors(name: str, width: tuple[float, float], data: list) -> list[float]:
    """Error of the ``name`` regression at ``width`` on every case that has that regressor set."""
    sigma = (width[0], width[0], width[1])
    return [
        bench.primary_error(s, prep, cd.local_regression(prep["input_mean"], regs[name], sigma))
        for s, prep, regs in data
        if name in regs
    ]


def study(data: dict[str, list], k: int, log) -> dict[str, dict[str, Any]]:
    """Per regressor set: val-tuned width and its test / real scores, and the real scan's own best width."""
    results: dict[str, dict[str, Any]] = {}
    for name in SETS:
        start = time.perf_counter()
        scores = [cd.geometric_mean(errors(name, w, data["val"]) or [np.nan]) for w in GRID]
        if np.all(np.isnan(scores)):
            continue
        width = GRID[int(np.nanargmin(scores))]
        row: dict[str, Any] = {"val_width": width, "val": float(np.nanmin(scores))}
        row["sim_test"] = float(np.median(errors(name, width, data["sim_test"])))
        if name not in ORACLE_SETS and data["real"]:
            on_real = {w: float(np.median(errors(name, w, data["real"]))) for w in GRID}
            row["real"] = on_real[width]
            row["real_oracle_width"] = min(on_real, key=on_real.get)
            row["real_oracle"] = on_real[row["real_oracle_width"]]
        results[name] = row
        log(f"k={k} {name}: {json.dumps(row)} ({time.perf_counter() - start:.0f} s)")
    return results


def guide_ablation(models: list[bench.Model], data: dict[str, list], k: int, log) -> dict[str, dict[str, float]]:
    """Median sim test / real error of each network with its guide and with the guide blurred."""
    results = {}
    for model in models:
        for guide in ("guide", "guide_blurred"):
            row = {}
            for key in ("sim_test", "real"):
                errs = []
                for s, prep, _ in data[key]:
                    if guide == "guide_blurred":
                        prep = dict(prep, guide=ndimage.gaussian_filter(prep["guide"], GUIDE_BLUR, mode="nearest"))
                    errs.append(bench.primary_error(s, prep, bench.run_model(model, prep)))
                if errs:
                    row[key] = float(np.median(errs))
            results[f"{model.name}, {guide}"] = row
            log(f"k={k} {model.name} with {guide}: {json.dumps(row)}")
    return results


def markdown(results: dict[int, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| k | regressors | width (val) | sim test | x blur | real (val width) | x blur | real, best width | x blur |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, rows in results.items():
        ref = rows["gaussian"]
        for name, r in rows.items():
            cells = [f"{r[key]:.4f} | {r[key] / ref[key]:.2f}x" if key in r else "- | -" for key in KEYS]
            width = f"{r['val_width'][0]:g} / {r['val_width'][1]:g}"
            lines.append(f"| {k} | {name} | {width} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_markdown(results: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = ["| k | network, guide | sim test | real |", "|---|---|---|---|"]
    for k, rows in results.items():
        for name, r in rows.items():
            lines.append(f"| {k} | {name} | {r.get('sim_test', np.nan):.4f} | {r.get('real', np.nan):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val_dir", type=Path, required=True)
    parser.add_argument("--test_dir", type=Path, required=True)
    parser.add_argument("--real_dir", type=Path)
    parser.add_argument("--k", type=int, nargs="+", default=[2])
    parser.add_argument("--model", action="append", help="NAME=weights.pt[:config.json...][:key=value,...]")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f}s] {text}", flush=True)

    val = bench.load_series(args.val_dir, simulated=True, limit=None)
    test = bench.load_series(args.test_dir, simulated=True, limit=None)
    real = bench.load_series(args.real_dir, simulated=False, limit=None) if args.real_dir else []
    models = bench.build_models(args.model)
    results, ablation = {}, {}
    for k in args.k:
        data = {"val": cases(val, k, 1), "sim_test": cases(test, k, 1), "real": cases(real, k, bench.MAX_REAL_GROUPS)}
        results[k] = study(data, k, log)
        ablation[k] = guide_ablation(models, data, k, log)
    print(markdown(results), ablation_markdown(ablation), sep="\n\n")
    if args.out:
        out = {"command": " ".join(sys.argv), "regression": results, "guide_ablation": ablation}
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
