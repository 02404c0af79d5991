"""Which SD estimator for the enhanced deltaM? Every candidate on the same inputs, against the truth.

For each series of a simulated split (first k pairs as input) and each real long scan (disjoint
groups of k pairs, reference = the other pairs), computes the enhanced map and, in normalised units,
the raw SD maps of the candidates:

- ``twin_fd1``: one-sided response to the twin, (f(m + t) - f(m)), local RMS (1 extra pass)
- ``twin_fd01``: one-sided finite difference with a small step, (f(m + 0.1 t) - f(m)) / 0.1 (a
  Jacobian-vector product along the twin; 1 extra pass)
- ``twin_pm``: two-sided, (f(m + t) - f(m - t)) / 2 (2 extra passes)
- ``twin_fd1_d3``: as twin_fd1 averaged over every zero-sum pair contrast (k - 1 draws; k >= 3)
- ``frozen``: the twin through the network's own per-voxel mixing weights held fixed, passed
  through where the noise bound clips (analytic, no extra backbone pass when cached)
- ``input``: the k-pair mean's local noise SD from the twin alone (scaled by one attenuation factor)
- window variants of twin_fd1 (``_w1``: sigma 1,1,0.5 voxels; ``_w3``: 3,3,1.5)
- k = 1 (no twin): ``hp_resp`` the response to a high-pass pseudo-twin (pair minus its blur),
  ``hp`` the high-pass local RMS alone
- features for a bias term: ``feat_detail`` (local RMS of the enhanced map minus its blur, sigma
  2, 2, 1 voxels) and ``feat_level`` (the enhanced map's local mean, absolute)

and saves, per voxel inside the scoring mask, the error (enhanced - truth, or - reference with the
reference's noise variance), the noise part of the error (f(truth + noise) - f(truth), simulated) and
every raw SD (real: the reference's noise variance averaged over the SD window, as
``evaluation.local_reference_variance``). ``analyse_candidates.py`` fits the calibration on the
validation split and scores the rest.

Usage: python studies/uncertainty/candidates.py --data data/bench_val --simulated --out .cache/uncertainty/val.npz
       python studies/uncertainty/candidates.py --data /path/real --out .cache/uncertainty/real.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from asl_enhance import uncertainty as unc
from asl_enhance.evaluation import local_reference_variance
from asl_enhance.smoothing import gaussian_smooth

import asl_bench.core as bench
from asl_bench.calibration import load_real

HIGHPASS = (1.0, 1.0, 0.5)
DETAIL_SIGMA = (2.0, 2.0, 1.0)
WINDOWS = {"": unc.WINDOW, "_w1": (1.0, 1.0, 0.5), "_w3": (3.0, 3.0, 1.5)}


def frozen_response(net, image: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """The draw through the mixing weights the network chose for ``image`` (weights held fixed)."""
    mean = image[:, :1]
    stack = torch.cat([s(mean) for s in net.smoothers], dim=1)
    out = net.backbone(torch.cat([image, stack], dim=1))
    weights = torch.softmax(out[:, : net.num_scales], dim=1)
    mixed = (weights * stack).sum(dim=1, keepdim=True) + (out[:, net.num_scales : net.num_scales + 1])
    resp = (weights * torch.cat([s(draw) for s in net.smoothers], dim=1)).sum(dim=1, keepdim=True)
    if net.noise_bound > 0 and float(image[:, net.twin_channel + 1].max()) > 0.5:
        limit = net.noise_bound * net.local_noise_sd(image)
        resp = torch.where((mixed - mean).abs() >= limit, draw, resp)
    return resp


@torch.inference_mode()
def candidates(net, image: torch.Tensor, pairs_norm: np.ndarray, twin_ch: int) -> tuple[torch.Tensor, dict]:
    """The prediction and every candidate's raw SD map (normalised units) for one input."""
    pred = net(image)
    k = pairs_norm.shape[0]
    out: dict[str, torch.Tensor] = {}
    if k >= 2:
        twin = image[:, twin_ch : twin_ch + 1]
        fd1 = unc.response(net, image, twin, pred, 1.0) ** 2
        for suffix, window in WINDOWS.items():
            out[f"twin_fd1{suffix}"] = unc.local_rms(fd1, window)
        out["twin_fd01"] = unc.local_rms(unc.response(net, image, twin, pred, 0.1) ** 2)
        # two-sided difference (f(m + d) - f(m - d)) / 2, from the two one-sided responses
        two_sided = (unc.response(net, image, twin, pred, 1.0) - unc.response(net, image, -twin, pred, 1.0)) / 2
        out["twin_pm"] = unc.local_rms(two_sided**2)
        out["frozen"] = unc.local_rms(frozen_response(net, image, twin) ** 2)
        out["input"] = unc.local_rms(twin**2)
        if k >= 3:
            draws = torch.as_tensor(unc.noise_draws(pairs_norm))[None]
            out["twin_fd1_d3"] = unc.enhanced_sd(net, image, draws[:, :3], pred, 1.0)
    else:
        m = image[0, 0].numpy()
        hp = torch.as_tensor(m - gaussian_smooth(m, HIGHPASS))[None, None]
        out["hp_resp"] = unc.local_rms(unc.response(net, image, hp, pred, 1.0) ** 2)
        out["hp"] = unc.local_rms(hp**2)
    return pred, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--simulated", action="store_true")
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--groups", type=int, default=1, help="real: disjoint input groups per series")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = bench.build_models(None)[0]
    net, twin_ch = model.net, model.layout.twin_channel
    store: dict[str, list] = {}
    start = time.perf_counter()
    series = bench.load_series(args.data, True, args.limit) if args.simulated else load_real([args.data])
    for s in series:
        for k in (int(v) for v in args.ks.split(",")):
            for group in bench.groups_for(s.num_pairs, k, args.groups):
                if not args.simulated and s.num_pairs - k < 2:
                    continue
                prep = bench.prepare(s, group)
                scale = float(prep["scale"])
                image = torch.as_tensor(prep["image"][None])
                pairs_norm = np.asarray(s.item["pairs"], np.float32)[group] / scale
                pred, cands = candidates(net, image, pairs_norm, twin_ch)
                mask = s.brain
                rec = {
                    "error": (pred[0, 0].numpy() - (s.truth if args.simulated else prep["other_mean"]) / scale)[mask],
                    "ref_var": (
                        np.zeros(mask.sum())
                        if args.simulated
                        else local_reference_variance(prep["target_noise_var"])[mask] / scale**2
                    ),
                    "k": np.full(mask.sum(), k, np.int8),
                    "series": np.full(mask.sum(), series.index(s), np.int16),
                    "group": np.full(mask.sum(), group[0] // k, np.int16),
                }
                if args.simulated:
                    with torch.inference_mode():
                        clean = image.clone()
                        clean[:, :1] = torch.as_tensor(s.truth / scale)[None, None]
                        rec["noise_part"] = (pred - net(clean))[0, 0].numpy()[mask]
                    rec["gm"] = s.tissues["GM"][mask] > 0.7
                    rec["wm"] = s.tissues["WM"][mask] > 0.9
                    rec["lesion"] = s.lesion[mask]
                for name, sd in cands.items():
                    rec[f"sd_{name}"] = sd[0, 0].numpy()[mask]
                # features of the enhanced map for a bias term (candidate c): its detail (local RMS of
                # what a 2-voxel blur removes) and its local level
                out = pred[0, 0].numpy()
                detail = torch.as_tensor((out - gaussian_smooth(out, DETAIL_SIGMA)) ** 2)[None, None]
                rec["feat_detail"] = unc.local_rms(detail)[0, 0].numpy()[mask]
                rec["feat_level"] = np.abs(gaussian_smooth(out, unc.WINDOW))[mask]
                for key, value in rec.items():
                    store.setdefault(f"k{k}_{key}", []).append(np.asarray(value, np.float32))
                print(f"{s.name} k={k} group {group}: {time.perf_counter() - start:.0f}s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, names=np.array([s.name for s in series]), **{k: np.concatenate(v) for k, v in store.items()}
    )


if __name__ == "__main__":
    main()
