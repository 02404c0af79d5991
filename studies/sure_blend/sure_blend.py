"""Per input, how much of the gate to use, chosen by Stein's unbiased risk estimate (SURE) on the twin.

On 3D real scans the network alone has less error than the gated output (ds000240, k = 2: 0.081 against
0.155), on 2D ones the gate has (prisma2dpcasl: 0.43 against 0.71). With a noise twin the input's own risk
can be estimated: for an output f(y) of the k-pair mean y with noise covariance S,
E|f(y) - x|^2 = E|f(y) - y|^2 - tr(S) + 2 tr(J_f S), and tr(J_f S) = E[n' J_f n] for a noise draw n with
covariance S: the twin, through one more network pass, f(y + e n) - f(y) ~ e J_f n. The blend
out_w = none + w (gated - none) is linear in w, so its SURE is a quadratic in w, minimised in closed form
and clipped to [0, 1] (and, as ``w_floor``, from below). Measured on the 8 real long scans with planted
lesions (gated.py's inputs) and simulated subjects.

    PYTHONPATH=asl_bundle:. python studies/sure_blend/sure_blend.py --sim_dir data/bench_test \
        --out studies/sure_blend/sure_blend.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from asl_enhance.metrics import nmse
from asl_enhance.transforms import NormalizeASLd

from asl_bench import core
from asl_bench import fidelity as fd
from studies.noise_gated_restore import gated

DEFAULT = gated.VARIANTS["0.9.0 + twin test 16-32 (0.10.0)"]
EPS = 0.1
LINEAR = False  # --linear: the divergence with the mix's weights held (no second backbone pass)


@torch.inference_mode()
def candidates(model: core.Model, prep: dict) -> dict[str, np.ndarray | float]:
    """The network alone, the default's gated output, their twin-probed divergences and the blend weight."""
    d = NormalizeASLd(keys=("input_mean",), layout=model.layout)(prep)
    x = torch.as_tensor(d["image"][None])
    net = model.net
    gated.set_variant(net, DEFAULT)
    tw = net.twin_channel
    twin = x[:, tw : tw + 1]
    head = net.head(x)
    region = head if head is not None and bool(head.any()) else torch.ones_like(twin, dtype=torch.bool)

    def both(inp):
        mixed, weights = net.mix(inp)
        return mixed, net.finish(inp, mixed, weights)

    none, gate = both(x)
    xp = x.clone()
    xp[:, :1] += EPS * twin
    if LINEAR:  # the mix's weights held: the perturbed proposal is the same mix of the perturbed blurs
        mixed, weights = net.mix(x)
        none_p = mixed + EPS * (weights * net.blur_stack(twin)).sum(dim=1, keepdim=True)
        gate_p = net.finish(xp, none_p, weights)
    else:
        none_p, gate_p = both(xp)
    y = x[:, :1]
    div_n = float(((none_p - none) / EPS * twin)[region].sum())
    div_g = float(((gate_p - gate) / EPS * twin)[region].sum())
    a, b = (none - y)[region], (gate - none)[region]
    # SURE(w) = |a + w b|^2 + 2 ((1 - w) div_n + w div_g) + const
    w = float(-(2 * (a * b).sum() + 2 * (div_g - div_n)) / (2 * (b * b).sum()).clamp_min(1e-12))
    region_mean = lambda v: float(v[region].mean())  # noqa: E731
    level = region_mean(gate) - region_mean(none)  # the restored map's head mean over the network's
    scale = float(d["scale"])
    return {
        "level": level * scale,
        "none": none[0, 0].numpy() * scale,
        "gated": gate[0, 0].numpy() * scale,
        "w": w,
        "div_n": div_n,
        "div_g": div_g,
        "tr_s": float((twin * twin)[region].sum()),
    }


def blends(c: dict, floors=(0.0, 0.25, 0.5)) -> dict[str, np.ndarray]:
    out = {"none": c["none"], "default (0.10.0)": c["gated"]}
    for f in floors:
        w = min(1.0, max(f, c["w"]))
        out[f"sure w>={f:g}"] = c["none"] + w * (c["gated"] - c["none"])
    w = min(1.0, max(0.0, c["w"]))
    out["sure, restored level"] = c["none"] + w * (c["gated"] - c["none"]) + (1 - w) * c["level"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="network=asl_bundle/models/model.pt")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sim_dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", action="store_true")
    p.add_argument("--linear", action="store_true", help="divergence with the mix's weights held (one pass)")
    args = p.parse_args()
    global LINEAR
    LINEAR = args.linear
    if args.report:
        report(json.loads(args.out.read_text()), args.ks)
        return
    model = core.build_model(args.model, core.INFERENCE_CONFIG)
    series = fd.study_series()
    opts = fd.Options()
    rows = []
    for si, s in enumerate(series):
        start = time.perf_counter()
        gm, wm = fd.quantile_masks(s.item["pairs"].mean(axis=0), s.brain)
        for g in fd.planted_groups(s, si, args.ks, opts):
            prep, prep_l = core.prepare(s, g.group), core.prepare(g.planted, g.group)
            c, c_l = candidates(model, prep), candidates(model, prep_l)
            plain, lesioned = blends(c), blends(c_l)
            fd.add_gaussian_curve(plain, lesioned, prep, prep_l, s.voxel)
            for name, out in plain.items():
                row = {"scan": s.name, "k": g.k, "group": g.index, "method": name, "w": c["w"], "w_lesion": c_l["w"]}
                row.update(fd.planted_scores(out, lesioned[name], prep, g, gm, wm, s.brain))
                rows.append(row)
        prep = core.prepare(s, list(range(s.num_pairs)))
        for name, out in blends(candidates(model, prep)).items():
            row = {"scan": s.name, "k": s.num_pairs, "group": "all", "method": name}
            row.update(fd.no_harm(prep["input_mean"], out, gm, wm))
            rows.append(row)
        print(f"{s.name}: {time.perf_counter() - start:.0f}s", flush=True)
    if args.sim_dir:
        for s in core.load_series(args.sim_dir, True, None):
            for k in args.ks:
                prep = core.prepare(s, list(range(k)))
                c = candidates(model, prep)
                outs = blends(c)
                for w in fd.GAUSS_WIDTHS:
                    outs[f"gauss_{w:g}"] = fd.gaussian_curve_fn(w, s.voxel)(prep)
                for name, out in outs.items():
                    rows.append(
                        {
                            "scan": s.name,
                            "k": k,
                            "group": "sim",
                            "method": name,
                            "w": c["w"],
                            "nmse": nmse(out, s.truth, s.brain),
                        }
                    )
    args.out.write_text(json.dumps(rows, indent=1))
    report(rows, args.ks)


def report(rows: list[dict], ks) -> None:
    gated.report(rows, ks)
    for k in ks:
        kr = [r for r in rows if r["k"] == k and r["group"] not in ("all", "sim") and r["method"] == "none"]
        print(f"\nk = {k}: SURE weight per scan (median over inputs; unplanted / planted)")
        for sc in dict.fromkeys(r["scan"] for r in kr):
            ws = [r["w"] for r in kr if r["scan"] == sc]
            wl = [r["w_lesion"] for r in kr if r["scan"] == sc]
            print(f"{sc.split('/')[1]} | {np.median(ws):.2f} | {np.median(wl):.2f}")
        sr = [r for r in rows if r["k"] == k and r["group"] == "sim" and r["method"] == "none"]
        if sr:
            print(f"simulated: median w {np.median([r['w'] for r in sr]):.2f}")


if __name__ == "__main__":
    main()
