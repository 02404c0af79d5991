"""No-harm check on real phantom scans from a vendor the model never saw (Philips; no perfusion).

For every series, k and disjoint group of k consecutive pairs, each method's output is compared with the mean of
the other pairs (the phantom's own subtraction offset plus less noise):

- ``error``: noise-corrected MSE against that reference over the k-pair mean's (1 = the plain mean; the noise
  removed shows as less than 1, anything the method adds or takes of the reference's structure as more), and
  ``rmse_pct``, its root in % of the mean control level;
- ``r_guide``: correlation with the mean control image in the head (a uniform phantom: an output that draws its
  outline invents structure; the reference's own value is printed beside it);
- ``shift``: head mean of the output minus the k-pair mean's, in % of the mean control level (a denoiser that
  invents perfusion moves it up);
- ``coverage`` / ``mean_z2`` (models, k >= 2): the bundle's SD map against the reference, its noise added.

    python studies/held_out_phantom/phantom.py --phantom_dir data/real-phantom --ks 1 2 4 --groups 8 \\
        --model network=asl_bundle/models/model.pt --out studies/held_out_phantom/phantom.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "asl_bundle")]

from asl_bench import calibration as cal  # noqa: E402
from asl_bench import core as bench  # noqa: E402
from asl_bench.fidelity import gaussian_curve_fn  # noqa: E402

GAUSSIAN_WIDTHS = (0.75, 1.0, 1.5, 2.0)  # in-plane sigma, voxels (round in mm), as the fidelity curve


def corrected_mse(estimate: np.ndarray, prep: dict[str, Any], mask: np.ndarray) -> float:
    """Mean squared difference to the leave-out reference less that reference's noise variance."""
    diff = (estimate - prep["other_mean"])[mask].astype(np.float64)
    return float(np.mean(diff**2) - np.mean(prep["target_noise_var"][mask], dtype=np.float64))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def classical(voxel: Sequence[float]) -> dict[str, Callable[[dict[str, Any]], np.ndarray]]:
    """The k-pair mean and the Gaussian curve of the fidelity benchmark."""
    methods = {"mean": lambda prep: prep["input_mean"]}
    methods.update({f"gaussian {w}": gaussian_curve_fn(w, voxel) for w in GAUSSIAN_WIDTHS})
    return methods


def score_group(s: bench.Series, group: list[int], models: list[bench.Model], handler) -> list[dict[str, Any]]:
    """One row per method for one input group."""
    prep = bench.prepare(s, group)
    mask, guide = s.brain, s.item["guide"]
    level = float(np.mean(guide[mask], dtype=np.float64))  # the mean control image: no M0 here
    base_error = corrected_mse(prep["input_mean"], prep, mask)
    base_mean = float(np.mean(prep["input_mean"][mask], dtype=np.float64))
    outputs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        name: (np.asarray(fn(prep), np.float32), None) for name, fn in classical(s.voxel).items()
    }
    for model in models:
        outputs[model.name] = cal.enhance_with_sd(model, handler, prep, np.asarray(s.item["pairs"])[group])
    rows = []
    for name, (out, sd) in outputs.items():
        row = {
            "series": s.name,
            "k": len(group),
            "group": group,
            "method": name,
            "error": corrected_mse(out, prep, mask) / base_error,
            "rmse_pct": 100.0 * math.sqrt(max(corrected_mse(out, prep, mask), 0.0)) / level,
            "r_guide": correlation(out[mask], guide[mask]),
            "r_guide_reference": correlation(prep["other_mean"][mask], guide[mask]),
            "shift_pct": 100.0 * (float(np.mean(out[mask], dtype=np.float64)) - base_mean) / level,
        }
        if sd is not None:
            ref_var = cal.local_variance(prep["target_noise_var"])[mask]
            row.update(cal.interval_scores((out - prep["other_mean"])[mask], sd[mask], ref_var))
        rows.append(row)
    return rows


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
    return float(np.median(values)) if values else math.nan


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: medians per series, k and method (shift: median and how many groups moved up)."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["series"].split("/")[-1], row["k"], row["method"])].append(row)
    lines = [
        "| series | k | groups | method | error / mean's | RMSE % | r(guide) (reference) | shift % (up) "
        "| coverage / z^2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (series, k, method), cell in cells.items():
        up = sum(r["shift_pct"] > 0 for r in cell)
        cov = _median(cell, "coverage")
        cov_text = "-" if math.isnan(cov) else f"{cov:.3f} / {_median(cell, 'mean_z2'):.2f}"
        lines.append(
            f"| {series} | {k} | {len(cell)} | {method} | {_median(cell, 'error'):.3f} "
            f"| {_median(cell, 'rmse_pct'):.3f} | {_median(cell, 'r_guide'):+.3f} "
            f"({_median(cell, 'r_guide_reference'):+.3f}) | {_median(cell, 'shift_pct'):+.4f} ({up}/{len(cell)}) "
            f"| {cov_text} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom_dir", type=Path, required=True, help="BIDS root of the converted phantom runs")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--groups", type=int, default=8, help="disjoint input groups per series and k, at most")
    parser.add_argument("--model", action="append", help="NAME=weights.pt[:key=value,...] (asl-benchmark's form)")
    parser.add_argument("--out", type=Path, required=True, help="JSON of every row; the table goes beside it (.md)")
    args = parser.parse_args(argv)
    models = bench.build_models(args.model)
    handler = cal.shipped_handler()
    series = bench.load_series(args.phantom_dir, simulated=False, limit=None)
    rows = []
    for s in series:
        for k in args.ks:
            for group in bench.groups_for(s.num_pairs, k, args.groups):
                if s.num_pairs - k >= 2:  # the reference needs a noise variance
                    rows.extend(score_group(s, list(group), models, handler))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": [m.spec for m in models], "rows": rows}, indent=1))
    table = summary(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
