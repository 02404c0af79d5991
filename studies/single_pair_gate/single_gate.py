"""A single pair (k = 1) has no noise twin: can its own high-pass stand in for one in the noise gate?

The shipped k = 1 path gives back what the network removed at coarse scales only (a fixed Gaussian,
``restore_sigma``), whatever the input's noise: a clean or high-SNR single input is blurred. Here the
gate of k >= 2 runs on a stand-in twin, c x (mean - G_s(mean)), the pair's own high-pass (its RMS
times 1.1-1.3 estimated a pair's noise on real and simulated scans: studies/single_pair_noise).
Measured on: the 8 real long scans at k = 1 with planted lesions (as gated.py); a clean real input (the
mean of the first half of a scan's pairs given as one pair, scored against the other half's mean); the
simulator's noise-free truth as one pair; simulated subjects at k = 1 against their truth.

    PYTHONPATH=asl_bundle:. python studies/single_pair_gate/single_gate.py --sim_dir data/bench_test \
        --out studies/single_pair_gate/single_gate.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from asl_enhance.metrics import nmse, nmse_corrected
from asl_enhance.networks import GaussianSmooth
from asl_enhance.transforms import NormalizeASLd

from asl_bench import core
from asl_bench import fidelity as fd
from studies.noise_gated_restore import gated

DEFAULT_GATE = gated.VARIANTS["0.9.0 + twin test 16-32 (0.10.0)"]


def stand_in(c: float, sigma, twin_test=True, **extra) -> dict:
    gate = dict(DEFAULT_GATE["gate"])
    if not twin_test:
        gate.pop("twin_test", None)
    gate.update(extra)
    return {"bands": DEFAULT_GATE["bands"], "gate": gate, "single": (c, sigma)}


VARIANTS: dict[str, dict] = {
    "none": {},
    "fixed2 (0.10.0)": {"sigma": [2, 2, 1]},
    **{f"hp1 c{c:g}": stand_in(c, [1, 1, 0.5]) for c in (1.0, 1.2, 1.5)},
    **{f"hp.75 c{c:g}": stand_in(c, [0.75, 0.75, 0.4]) for c in (1.2, 1.5)},
    "hp1 c1.2 no twin test": stand_in(1.2, [1, 1, 0.5], twin_test=False),
    **{f"hp1.5 c{c:g}": stand_in(c, [1.5, 1.5, 0.75]) for c in (1.0, 1.2, 1.5)},
    **{f"hp2 c{c:g}": stand_in(c, [2, 2, 1]) for c in (1.0, 1.2)},
    **{f"hp3 c{c:g}": stand_in(c, [3, 3, 1.5]) for c in (1.0,)},
}


@torch.inference_mode()
def outputs(model: core.Model, prep: dict, variants: dict[str, dict]) -> dict[str, np.ndarray]:
    d = NormalizeASLd(keys=("input_mean",), layout=model.layout)(prep)
    x = torch.as_tensor(d["image"][None])
    net = model.net
    mixed, weights = net.mix(x)
    single = bool(x[:, net.twin_channel + 1].mean() < 0.5)  # no twin: the stand-in replaces it
    out = {}
    for name, variant in variants.items():
        gated.set_variant(net, variant)
        if "single" in variant and single:
            c, sigma = variant["single"]
            mean = x[:, :1]
            x2 = x.clone()
            x2[:, net.twin_channel : net.twin_channel + 1] = c * (mean - GaussianSmooth(3, sigma)(mean))
            x2[:, net.twin_channel + 1] = 1.0
            y = net.finish(x2, mixed, weights)
        else:
            y = net.finish(x, mixed, weights)
        out[name] = y[0, 0].numpy() * float(d["scale"])
    return out


def as_volumes(s: core.Series, first: int, volumes: int = 1) -> tuple[core.Series, list[int]]:
    """The series with its first ``first`` pairs averaged into ``volumes`` volumes (as a scanner that
    exports averages does) at its start, the rest after them as the reference."""
    pairs = s.item["pairs"]
    parts = np.array_split(np.arange(first), volumes)
    merged = np.concatenate([np.stack([pairs[i].mean(axis=0) for i in parts]), pairs[first:]], axis=0)
    return dataclasses.replace(s, item=dict(s.item, pairs=merged)), list(range(volumes))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="network=asl_bundle/models/model.pt")
    p.add_argument("--sim_dir", type=Path, default=None)
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", action="store_true", help="print the tables of an earlier --out and stop")
    args = p.parse_args()
    if args.report:
        report(json.loads(args.out.read_text()))
        return
    variants = {k: v for k, v in VARIANTS.items() if args.variants is None or k in args.variants}
    model = core.build_model(args.model, core.INFERENCE_CONFIG)
    series = fd.study_series()
    opts = fd.Options()
    rows = []
    for si, s in enumerate(series):
        start = time.perf_counter()
        gm, wm = fd.quantile_masks(s.item["pairs"].mean(axis=0), s.brain)
        for g in fd.planted_groups(s, si, (1,), opts):
            prep, prep_l = core.prepare(s, g.group), core.prepare(g.planted, g.group)
            plain, lesioned = outputs(model, prep, variants), outputs(model, prep_l, variants)
            fd.add_gaussian_curve(plain, lesioned, prep, prep_l, s.voxel)
            for name, out in plain.items():
                row = {"scan": s.name, "k": 1, "group": g.index, "method": name}
                row.update(fd.planted_scores(out, lesioned[name], prep, g, gm, wm, s.brain))
                rows.append(row)
        for volumes, label in ((1, "clean_half"), (2, "clean_half_2vol")):  # half the pairs, averaged
            half, group = as_volumes(s, s.num_pairs // 2, volumes)
            prep = core.prepare(half, group)
            outs = outputs(model, prep, variants)
            outs["mean_k"] = prep["input_mean"]
            for name, out in outs.items():
                row = {"scan": s.name, "k": volumes, "group": label, "method": name}
                row["nmse"] = nmse_corrected(out, prep["other_mean"], prep["target_noise_var"], s.brain)
                row.update(fd.no_harm(prep["input_mean"], out, gm, wm))
                rows.append(row)
        print(f"{s.name}: {time.perf_counter() - start:.0f}s", flush=True)
    if args.sim_dir:
        rows += simulated(model, args.sim_dir, variants)
    args.out.write_text(json.dumps(rows, indent=1))
    report(rows)


def simulated(model: core.Model, sim_dir: Path, variants: dict[str, dict]) -> list[dict]:
    """k = 1 against the truth, and the truth itself as one clean pair (no-harm)."""
    rows = []
    for s in core.load_series(sim_dir, True, None):
        prep = core.prepare(s, [0])
        outs = outputs(model, prep, variants)
        for w in fd.GAUSS_WIDTHS:
            outs[f"gauss_{w:g}"] = fd.gaussian_curve_fn(w, s.voxel)(prep)
        for name, out in outs.items():
            rows.append({"scan": s.name, "k": 1, "group": "sim", "method": name, "nmse": nmse(out, s.truth, s.brain)})
        clean = dataclasses.replace(s, item=dict(s.item, pairs=np.stack([s.truth] * 2)))
        prep = core.prepare(clean, [0])
        gm, wm = fd.simulated_masks(s)
        for name, out in outputs(model, prep, variants).items():
            row = {"scan": s.name, "k": 1, "group": "clean_sim", "method": name}
            row["nmse"] = nmse(out, s.truth, s.brain)
            row.update(fd.no_harm(prep["input_mean"], out, gm, wm))
            rows.append(row)
    return rows


PER_SCAN = ("mean_k", "fixed2 (0.10.0)", "hp1 c1.2", "hp2 c1")


def report(rows: list[dict]) -> None:
    gated.report([r for r in rows if not str(r["group"]).startswith("clean")], [1])
    for group in ("clean_half", "clean_half_2vol", "clean_sim"):
        gr = [r for r in rows if r["group"] == group]
        if not gr:
            continue
        print(f"\n{group}: method | NMSE | GM change | WM change | within 5%")
        for m in dict.fromkeys(r["method"] for r in gr):
            mr = [r for r in gr if r["method"] == m]
            print(
                f"{m} | {np.median([r['nmse'] for r in mr]):.4f} | "
                f"{np.median([r['noharm_gm_change'] for r in mr]):+.3f} | "
                f"{np.median([r['noharm_wm_change'] for r in mr]):+.3f} | {sum(r['noharm_ok'] for r in mr)}/{len(mr)}"
            )
        if group.startswith("clean_half"):
            print("per scan NMSE: scan | " + " | ".join(PER_SCAN))
            for sc in dict.fromkeys(r["scan"] for r in gr):
                vals = {r["method"]: r["nmse"] for r in gr if r["scan"] == sc}
                print(sc.split("/")[1] + " | " + " | ".join(f"{vals.get(m, float('nan')):.4f}" for m in PER_SCAN))


if __name__ == "__main__":
    main()
