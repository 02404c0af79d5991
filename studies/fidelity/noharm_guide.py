"""Is the deltaM-only run's no-harm miss the missing guide, or the scan?

With every pair in, the model lowers the GM-like median of the one real series without a guide (Oxford's
multi-PLD deltaM, no M0, no control) by about 11%, against 0-4% on the well-sampled guided scans. Two
explanations: the network without a guide blurs more (it was trained with 15% guide dropout), or that scan's
perfusion is finer for its voxels, so any smoothing lowers its GM-like voxels more. Here every guided scan is
run twice, with its guide and with the guide removed (zeros, as the reader gives a deltaM-only series), and
beside them Gaussians of a quarter and half a voxel: the guide's share is the difference between the first
two, the scan's sharpness shows in the Gaussians' drop.

    PYTHONPATH=asl_bundle:. python studies/fidelity/noharm_guide.py --real .cache/real/ds000240 ../shared/real-asl \\
        --model network=asl_bundle/models/model.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "asl_bundle")]

from asl_bench import core as bench  # noqa: E402
from asl_bench import fidelity as fd  # noqa: E402

WIDTHS = (0.25, 0.5)


def without_guide(series: bench.Series) -> bench.Series:
    """The series as the reader gives a deltaM-only one: guide zeros, source none (head mask kept)."""
    item = dict(series.item, guide=np.zeros_like(series.item["guide"]), guide_source="none")
    return dataclasses.replace(series, item=item)


def all_pair_changes(series: bench.Series, models: list[bench.Model]) -> dict[str, tuple[float, float]]:
    """GM-like / WM-like median change, every pair in, masks from the all-pair mean (the benchmark's check)."""
    every = list(range(series.num_pairs))
    prep = bench.prepare(series, every)
    gm, wm = fd.quantile_masks(prep["input_mean"], series.brain)
    out = {}
    for w in WIDTHS:
        output = np.asarray(fd.gaussian_curve_fn(w, series.voxel)(prep))
        c = fd.no_harm(prep["input_mean"], output, gm, wm)
        out[f"gauss_{w:g}"] = (c["noharm_gm_change"], c["noharm_wm_change"])
    has_guide = series.item.get("guide_source", "none") != "none"
    variants = [("", series)] + ([(" no guide", without_guide(series))] if has_guide else [])
    for suffix, s in variants:
        p = bench.prepare(s, every)
        for m in models:
            c = fd.no_harm(prep["input_mean"], np.asarray(bench.run_model(m, p)), gm, wm)
            out[m.name + suffix] = (c["noharm_gm_change"], c["noharm_wm_change"])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, nargs="+", required=True)
    parser.add_argument("--model", action="append", help="NAME=weights.pt[:key=value,...]")
    args = parser.parse_args(argv)
    models = bench.build_models(args.model)
    series, _ = fd.load_real(args.real)
    print("| scan | guide | method | GM / WM change, every pair in |")
    print("|---|---|---|---|")
    for s in series:
        scan, guide = s.name.split("/")[-1], s.item.get("guide_source", "none")
        for name, (gm, wm) in all_pair_changes(s, models).items():
            print(f"| {scan} | {guide} | {name} | {gm:+.3f} / {wm:+.3f} |")


if __name__ == "__main__":
    main()
