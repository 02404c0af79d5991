"""Per input, how much of each band of the restore to use, chosen by Stein's unbiased risk estimate.

The shipped blend (0.11.0, ``restore_sure_from`` 3) scales the whole restore by one weight w: from 3 pairs
it lowers the error at lesion contrast above the best blur's, at 2 pairs it gave up contrast (studies/
sure_blend). The restore is a sum of band pieces d_b (coarse to fine); a weight per band, as SureShrink
shrinks each wavelet subband, could keep the coarse bands (where lesions and tissue contrast stand above
the noise) and drop the fine ones (mostly noise). The output mixed + sum_b w_b d_b is linear in w, so its
SURE, |mixed - y + D w|^2 + 2 sum_b w_b tr(J_(d_b) S) + const, is a quadratic in w; minimised exactly over
the box [0, 1]^B (every active set of a 4-band restore: 81 small solves). The divergences use the twin as
the noise draw with the mix's weights held (the shipped blend's linear probe: no second network pass).

    PYTHONPATH=asl_bundle:. python studies/band_sure/band_sure.py --ks 2 3 4 --sim_dir data/bench_test \
        --out studies/band_sure/band_sure.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from asl_enhance.metrics import nmse
from asl_enhance.networks import NoiseGatedRestore
from asl_enhance.transforms import NormalizeASLd

from asl_bench import core
from asl_bench import fidelity as fd
from studies.noise_gated_restore import gated

EPS = 0.1
KINDS = ("one", "band", "coarse")  # the blends' weight vectors, as blends() names them


def band_pieces(gate: NoiseGatedRestore, removed: torch.Tensor, noise: torch.Tensor, head) -> list[torch.Tensor]:
    """The restore's output split by band (their sum is ``gate(removed, noise, head)``)."""
    pieces, coarser_r, coarser_n = [], torch.zeros_like(removed), torch.zeros_like(noise)
    for i, (blur, window) in enumerate(zip(gate.blurs, gate.windows)):
        r, n = blur(removed), blur(noise)
        band_r, band_n = r - coarser_r, n - coarser_n
        pieces.append(gate.band_gain(i, window(band_r * band_r), window(band_n * band_n), head) * band_r)
        coarser_r, coarser_n = r, n
    return pieces


def box_quadratic(q: np.ndarray, c: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """argmin of w'Qw/2 + c'w over lower <= w <= upper, exactly, by every active set (few variables)."""
    best, best_val = np.clip(np.zeros_like(c), lower, upper), np.inf
    for state in itertools.product((0, 1, 2), repeat=len(c)):  # 0 free, 1 at lower, 2 at upper
        w = np.where(np.array(state) == 1, lower, upper).astype(float)
        free = np.array(state) == 0
        if free.any():
            qf = q[np.ix_(free, free)]
            rhs = -(c[free] + q[np.ix_(free, ~free)] @ w[~free])
            try:
                w[free] = np.linalg.solve(qf + 1e-12 * np.eye(int(free.sum())), rhs)
            except np.linalg.LinAlgError:
                continue
        if np.any(w < lower - 1e-9) or np.any(w > upper + 1e-9):
            continue
        val = 0.5 * w @ q @ w + c @ w
        if val < best_val:
            best, best_val = w, val
    return best


@torch.inference_mode()
def candidates(model: core.Model, prep: dict) -> dict:
    """Network alone, restored map, band pieces and their SURE terms for one input."""
    d = NormalizeASLd(keys=("input_mean",), layout=model.layout)(prep)
    x = torch.as_tensor(d["image"][None])
    net = model.net
    tw = net.twin_channel
    twin = x[:, tw : tw + 1]
    head = net.head(x)
    region = head if head is not None and bool(head.any()) else torch.ones_like(twin, dtype=torch.bool)
    y = x[:, :1]
    mixed, weights = net.mix(x)
    moved = (weights * net.blur_stack(twin)).sum(dim=1, keepdim=True)
    noise = twin - moved
    pieces = band_pieces(net.gate, y - mixed, noise, head)
    moved_pieces = band_pieces(net.gate, (y + EPS * twin) - (mixed + EPS * moved), noise, head)
    dmat = np.stack([p[region].double().numpy() for p in pieces], axis=1)
    probe = twin[region].double().numpy()
    div = np.array([((mp - p)[region].double().numpy() * probe).sum() / EPS for p, mp in zip(pieces, moved_pieces)])
    a = (mixed - y)[region].double().numpy()
    scale = float(d["scale"])
    return {
        "mixed": mixed[0, 0].numpy() * scale,
        "pieces": [p[0, 0].numpy() * scale for p in pieces],
        "piece_means": [float(p[region].mean()) * scale for p in pieces],
        "q": 2 * dmat.T @ dmat,
        "c": 2 * (dmat.T @ a + div),
    }


def blends(c: dict) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """The network alone, the restored map, one weight for all bands and one per band (restored level
    kept), and per band with the coarsest band kept whole."""
    nb = len(c["pieces"])
    restored = c["mixed"] + sum(c["pieces"])
    full_level = sum(c["piece_means"])

    def out(w):
        level = full_level - float(np.dot(w, c["piece_means"]))  # keep the restored map's head mean
        return c["mixed"] + sum(wi * p for wi, p in zip(w, c["pieces"])) + level

    ones = np.ones(nb)
    qs, cs = c["q"].sum(), c["c"].sum()  # one weight for all bands: w = t * ones
    w_one = float(np.clip(-cs / max(qs, 1e-12), 0, 1)) * ones
    w_band = box_quadratic(c["q"], c["c"], np.zeros(nb), ones)
    lower = np.zeros(nb)
    lower[0] = 1.0
    w_coarse = box_quadratic(c["q"], c["c"], lower, ones)
    outs = {
        "none": c["mixed"],
        "restored (0.10.0)": restored,
        "sure one w": out(w_one),
        "sure per band": out(w_band),
        "sure per band, coarse kept": out(w_coarse),
    }
    return outs, {"one": w_one.tolist(), "band": w_band.tolist(), "coarse": w_coarse.tolist()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="network=asl_bundle/models/model.pt")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sim_dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
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
            (plain, w), (lesioned, w_l) = blends(candidates(model, prep)), blends(candidates(model, prep_l))
            fd.add_gaussian_curve(plain, lesioned, prep, prep_l, s.voxel)
            for name, out in plain.items():
                row = {"scan": s.name, "k": g.k, "group": g.index, "method": name, "w": w, "w_lesion": w_l}
                row.update(fd.planted_scores(out, lesioned[name], prep, g, gm, wm, s.brain))
                rows.append(row)
        prep = core.prepare(s, list(range(s.num_pairs)))
        outs, _ = blends(candidates(model, prep))
        for name, out in outs.items():
            row = {"scan": s.name, "k": s.num_pairs, "group": "all", "method": name}
            row.update(fd.no_harm(prep["input_mean"], out, gm, wm))
            rows.append(row)
        print(f"{s.name}: {time.perf_counter() - start:.0f}s", flush=True)
    if args.sim_dir:
        for s in core.load_series(args.sim_dir, True, None):
            for k in args.ks:
                prep = core.prepare(s, list(range(k)))
                outs, w = blends(candidates(model, prep))
                for width in fd.GAUSS_WIDTHS:
                    outs[f"gauss_{width:g}"] = fd.gaussian_curve_fn(width, s.voxel)(prep)
                for name, out in outs.items():
                    row = {"scan": s.name, "k": k, "group": "sim", "method": name, "w": w}
                    rows.append(dict(row, nmse=nmse(out, s.truth, s.brain)))
    args.out.write_text(json.dumps(rows, indent=1))
    report(rows, args.ks)


def report(rows: list[dict], ks) -> None:
    gated.report(rows, ks)
    for k in ks:
        kr = [r for r in rows if r["k"] == k and r["group"] not in ("all", "sim") and r["method"] == "none"]
        print(f"\nk = {k}: weights per scan (medians over inputs, unplanted): one w | per band | coarse kept")
        for sc in dict.fromkeys(r["scan"] for r in kr):
            ws = [r["w"] for r in kr if r["scan"] == sc]
            cols = [" ".join(f"{v:.2f}" for v in np.median([w[key] for w in ws], axis=0)) for key in KINDS]
            print(f"{sc.split('/')[-1]} | " + " | ".join(cols))
        sr = [r for r in rows if r["k"] == k and r["group"] == "sim" and r["method"] == "none"]
        if sr:
            print(f"simulated per band: {np.median([r['w']['band'] for r in sr], axis=0).round(2).tolist()}")


if __name__ == "__main__":
    main()
