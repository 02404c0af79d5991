"""A moved pair: how much of its subtraction artefact does each method pass on? (study only)

Motion between a control and its label leaves, in that pair's difference, the static tissue image minus
its displaced copy: edges at the head's rim and at tissue borders, often far larger than deltaM. On each
real long scan with control images (ds000240 and ``../shared/real-asl``; multi-PLD runs at their longest
PLD, as the benchmark), the first pair of each 2-pair input group gets the artefact A = C - shift(C, d),
C the scan's mean control image (as the scanner recorded it, background suppression included), d an
in-plane shift of ``--shifts`` voxels (linear interpolation). The unused pairs stay clean.

Per method (2-pair mean; the enhanced map, default and the network alone; Gaussians of the benchmark's
curve; each scan's best Gaussian on the clean input), against the unused pairs' mean:

- ``nmse``: noise-corrected error on the corrupted input (and ``nmse_clean`` on the same input without A);
- ``passed``: how much of the artefact the method passes on, <f(corrupted) - f(clean), A/2> / <A/2, A/2>
  in the head (A/2: the artefact in the 2-pair mean; 1 = all of it, 0 = none);
- ``S``: the enhanced sidecar's InputPerfusionToNoise for the corrupted input (below 4 it warns).

    python studies/motion/motion.py --out studies/motion/motion.json          # 2 min
    python studies/motion/motion.py --out studies/motion/motion.json --report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from asl_enhance.bids import load_asl_series
from asl_enhance.metrics import nmse_corrected
from asl_enhance.smoothing import gaussian_smooth
from asl_enhance.writers import scan_test_fields
from scipy import ndimage

from asl_bench import core
from asl_bench import fidelity as fd
from studies.noise_gated_restore import gated

MODELS = {
    "enhanced (default, 0.10.0)": "asl_bundle/models/model.pt",
    "network alone": "asl_bundle/models/model.pt:restore_bands=[],restore_sigma=0",
    "0.9.0 + scan test 4 (option)": "asl_bundle/models/model.pt:restore_scan_test=4,restore_twin_test=[]",
    "default + scan test 4 (option)": "asl_bundle/models/model.pt:restore_scan_test=4",
    "0.8.0 (no scan floor)": "asl_bundle/models/model.pt:restore_scan_floor=0,restore_twin_test=[]",
}
BANDS = {"restore_bands": [[2.5, 2.5, 1.25]], "restore_scan_test": 0}
#: gates of studies/noise_gated_restore/gated.py measured here as well
GATED_VARIANTS = ("0.8.0 + scan floor 1 (0.9.0)", "0.9.0 + twin test 4-8", "0.9.0 + twin test 8-16")


def with_variant(model: core.Model, name: str) -> core.Model:
    """The model with one of studies/noise_gated_restore/gated.py's gates after its network."""
    gated.set_variant(model.net, gated.VARIANTS[name])
    return model


def load_scans() -> list[core.Series]:
    series = fd.study_series()
    return [s for s in series if load_asl_series(s.item).control_mean is not None]


def artefact(series: core.Series, shift: float) -> np.ndarray:
    """The subtraction artefact of a label displaced by ``shift`` voxels along the first in-plane axis."""
    control = np.asarray(load_asl_series(series.item).control_mean, np.float64)
    return (control - ndimage.shift(control, (shift, 0.0, 0.0), order=1, mode="nearest")).astype(np.float32)


def methods(models: dict[str, core.Model], voxel) -> dict:
    out = {"2-pair mean": lambda prep: prep["input_mean"]}
    for width in fd.GAUSS_WIDTHS:
        sigma = tuple(width / u for u in fd.voxel_units(voxel))
        out[f"gauss_{width:g}"] = lambda prep, s=sigma: gaussian_smooth(prep["input_mean"], s)
    for name, model in models.items():
        out[name] = lambda prep, m=model: core.run_model(m, prep)
    return out


def score_group(series, group, art, models) -> list[dict]:
    corrupted_pairs = np.array(series.item["pairs"], np.float32)
    corrupted_pairs[group[0]] += art
    corrupted = dataclasses.replace(series, item=dict(series.item, pairs=corrupted_pairs))
    clean_prep, prep = core.prepare(series, group), core.prepare(corrupted, group)
    ref, var, head = prep["other_mean"], prep["target_noise_var"], series.brain
    half = art / 2.0
    energy = float(np.sum(half[head].astype(np.float64) ** 2))
    s_value = scan_test_fields(dict(prep, stem="x", input_pairs="[0, 1]"), BANDS)["InputPerfusionToNoise"]
    rows = []
    for name, fn in methods(models, series.voxel).items():
        out, clean = fn(prep), fn(clean_prep)
        passed = float(np.sum(((out - clean) * half)[head].astype(np.float64)) / energy)
        rows.append(
            {
                "method": name,
                "nmse": nmse_corrected(out, ref, var, head),
                "nmse_clean": nmse_corrected(clean, ref, var, head),
                "passed": passed,
                "S": s_value,
                "artefact_over_signal": float(np.sqrt(energy / np.sum(ref[head].astype(np.float64) ** 2))),
            }
        )
    return rows


def report(rows: list[dict]) -> str:
    lines = []
    for shift in sorted({r["shift"] for r in rows}):
        sel = [r for r in rows if r["shift"] == shift]
        ratio = np.median([r["artefact_over_signal"] for r in sel])
        s_vals = sorted({round(r["S"], 2) for r in sel})
        lines += [
            f"\nshift {shift:g} voxel: artefact RMS / signal RMS in the 2-pair mean (median) {ratio:.2f}; "
            f"S {min(s_vals):g}-{max(s_vals):g} ({sum(v < 4 for v in s_vals)} of {len(s_vals)} inputs warn)\n",
            "| method | NMSE, moved pair | NMSE, clean | artefact passed on | scans where moved NMSE <= best blur's |",
            "|---|---|---|---|---|",
        ]
        by_scan: dict[str, dict[str, list[float]]] = {}
        for r in sel:
            by_scan.setdefault(r["scan"], {}).setdefault(r["method"], []).append(r["nmse"])
        best = {
            scan: min(np.median(v) for m, v in ms.items() if m.startswith("gauss_")) for scan, ms in by_scan.items()
        }
        for method in dict.fromkeys(r["method"] for r in sel):
            m_rows = [r for r in sel if r["method"] == method]
            wins = sum(np.median(by_scan[s][method]) <= best[s] + 1e-12 for s in by_scan)
            lines.append(
                f"| {method} | {np.median([r['nmse'] for r in m_rows]):.3f} | "
                f"{np.median([r['nmse_clean'] for r in m_rows]):.3f} | "
                f"{np.median([r['passed'] for r in m_rows]):.2f} | {wins}/{len(by_scan)} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shifts", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if args.report:
        print(report(json.loads(args.out.read_text())))
        return
    models = {name: core.build_model(f"m={spec}", core.INFERENCE_CONFIG) for name, spec in MODELS.items()}
    for name in GATED_VARIANTS:
        models[name] = with_variant(core.build_model(f"m={MODELS['network alone']}", core.INFERENCE_CONFIG), name)
    rows = []
    for series in load_scans():
        for shift in args.shifts:
            art = artefact(series, shift)
            for g, group in enumerate(core.groups_for(series.num_pairs, 2, args.groups)):
                for row in score_group(series, group, art, models):
                    rows.append(dict(row, scan=series.name.split("/")[1], shift=shift, group=g))
        print(series.name, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(report(rows))


if __name__ == "__main__":
    main()
