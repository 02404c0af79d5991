"""Does the noise twin read the noise the network removed, and what does a misread cost? (study only)

On each real long scan a known-noise input is built: the all-pair mean s stands for the truth, and the
noise draws are differences of consecutive pairs, e_m = (pair_2m - pair_2m+1) / sqrt(2): a single pair's
noise (real, spatially correlated), perfusion-free, uncorrelated with s and with each other. Input pair m
is s + e_m, so the noise of a k-pair input is known. For the network's
per-voxel weights W (computed on that input), per gate band and inside the head:

- ``true``: energy of the noise the mix removed, band(e - W e), e the k-pair mean of the e_i;
- ``twin``: the gate's estimate of it, band(t - W t), t the noise twin of the same pairs;
- ``free``: the same mix applied to the noise of another group of pairs, band(e' - W e'), which the
  weights never saw: what the removed noise would be if the weights did not follow the input's noise.

true / twin > 1 means the gate under-reads the removed noise and gives some of it back; true / free > 1
that the weights select the input's own noise (a blur placed where the noise happens to be). Errors
(NMSE against s, inside the head): the network alone, the default gate, and the same gate given the true
removed noise instead of the twin's (``oracle``). Shipped weights on every scan; each fold's fine-tuned
weights (studies/real_n2n) on the scans of the people it never saw.

    python studies/gate_noise/removed_noise.py --out studies/gate_noise/removed_noise.json   # 1 min
    python studies/gate_noise/removed_noise.py --out studies/gate_noise/removed_noise.json --report
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from asl_enhance.networks import GaussianSmooth, NoiseGatedRestore
from asl_enhance.transforms import NormalizeASLd, noise_twin

from asl_bench import core
from asl_bench import fidelity as fd

WEIGHTS = {
    "shipped": ("asl_bundle/models/model.pt", None),
    "fine-tuned": ("runs/real_n2n/prisma/model.pt", "prisma"),  # tested on the Prisma volunteer
    "fine-tuned ": ("runs/real_n2n/other/model.pt", "other"),  # tested on ds000240 and Oxford
}


#: the default gate's bands and smallest window (inference.json restore_bands, restore_window)
BANDS = [[2.5, 2.5, 1.25], [1.5, 1.5, 0.75], [0.75, 0.75, 0.4], [0.0, 0.0, 0.0]]
WINDOW = [3.0, 3.0, 1.5]


def load_scans() -> list[core.Series]:
    return fd.study_series()


def in_fold(name: str, fold: str | None) -> bool:
    prisma = "prisma" in name
    return fold is None or (fold == "prisma") == prisma


def known_noise(series: core.Series) -> tuple[np.ndarray, np.ndarray]:
    """(s, e): the all-pair mean and the noise draws, differences of consecutive pairs over sqrt(2)."""
    pairs = np.asarray(series.item["pairs"], np.float64)
    half = pairs.shape[0] // 2
    return pairs.mean(axis=0), (pairs[0 : 2 * half : 2] - pairs[1 : 2 * half : 2]) / np.sqrt(2.0)


def band_split(volume: torch.Tensor, gate) -> list[torch.Tensor]:
    out, coarser = [], torch.zeros_like(volume)
    for blur in gate.blurs:
        smooth = blur(volume)
        out.append(smooth - coarser)
        coarser = smooth
    return out


def band_gains(gate, removed: torch.Tensor, noise: torch.Tensor | list[torch.Tensor], head) -> list[torch.Tensor]:
    """The gate's gain per band, as its forward computes them; with several noise draws, their mean energy."""
    draws = [band_split(n, gate) for n in (noise if isinstance(noise, list) else [noise])]
    gains = []
    for i, band_r in enumerate(band_split(removed, gate)):
        window, noise_window = gate.windows[i], getattr(gate, "noise_windows", gate.windows)[i]
        energy_n = sum(noise_window(d[i] * d[i]) for d in draws) / len(draws)
        gains.append(gate.band_gain(i, window(band_r * band_r), energy_n, head))
    return gains


def wide_noise(gate: NoiseGatedRestore, scale: float) -> NoiseGatedRestore:
    """The gate with its noise energies averaged in windows ``scale`` times its own (removed: as before)."""
    gate = copy.deepcopy(gate)
    gate.noise_windows = torch.nn.ModuleList(
        [GaussianSmooth(3, [scale * float(s) for s in sigmas]) for sigmas in window_sigmas(gate)]
    )
    return gate


def window_sigmas(gate: NoiseGatedRestore) -> list[list[float]]:
    """The gate's energy windows (as its __init__ builds them from BANDS and WINDOW)."""
    return [[max(w, 2.0 * v) for w, v in zip(WINDOW, band)] for band in BANDS]


def variant_gates(net) -> dict[str, NoiseGatedRestore]:
    """The default gate and simpler ones, all on the default bands and windows."""
    bands, window = BANDS, WINDOW
    return {
        "default": net.gate,
        "default, noise window x2": wide_noise(net.gate, 2.0),
        "default, noise window x4": wide_noise(net.gate, 4.0),
        "a1,1,1,3 floor": NoiseGatedRestore(3, bands, min_window=window, alpha=[1, 1, 1, 3], scan_floor=1.0),
        "a1,1,1,3": NoiseGatedRestore(3, bands, min_window=window, alpha=[1, 1, 1, 3]),
        "a0,1,1,3 (0.8.0)": NoiseGatedRestore(3, bands, min_window=window, alpha=[0, 1, 1, 3]),
    }


def energies(a: torch.Tensor, gate, head: torch.Tensor) -> list[float]:
    return [float((b[head] ** 2).sum()) for b in band_split(a, gate)]


def nmse(out: torch.Tensor, truth: torch.Tensor, head: torch.Tensor) -> float:
    return float(((out - truth)[head] ** 2).sum() / (truth[head] ** 2).sum())


@torch.inference_mode()
def measure(model: core.Model, series: core.Series, group: list[int], other: list[int]) -> dict:
    s, e = known_noise(series)
    pairs = (s[None] + e[group]).astype(np.float32)
    item = dict(series.item, pairs=np.concatenate([pairs, series.item["pairs"][:2]]))
    prep = core.prepare(dataclasses.replace(series, item=item), list(range(len(group))))
    d = NormalizeASLd(keys=("input_mean",), layout=model.layout)(prep)
    x = torch.as_tensor(d["image"][None])
    scale = float(d["scale"])
    net = model.net
    mixed, weights = net.mix(x)

    def removed_by_mix(v: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor((v / scale).astype(np.float32))[None, None]
        return t - (weights * net.blur_stack(t)).sum(dim=1, keepdim=True)

    noise_true = removed_by_mix(e[group].mean(axis=0))
    noise_free = removed_by_mix(e[other].mean(axis=0))
    twin_other = removed_by_mix(noise_twin(e[other].astype(np.float32)))
    tw = net.twin_channel
    twin = x[:, tw : tw + 1]
    noise_twin_est = twin - (weights * net.blur_stack(twin)).sum(dim=1, keepdim=True)
    check = noise_twin(e[group].astype(np.float32)) / scale
    assert np.allclose(check, twin[0, 0].numpy(), atol=1e-4 * float(np.abs(check).max())), "twin mismatch"
    head = net.head(x)
    brain = torch.as_tensor(series.brain)[None, None]
    truth = torch.as_tensor((s / scale).astype(np.float32))[None, None]
    mean = x[:, :1]
    removed = mean - mixed
    signal_removed = removed - noise_true  # the truth's part of what the proposal removed (+ its residual)
    row = {
        "true": energies(noise_true, net.gate, brain),
        "twin": energies(noise_twin_est, net.gate, brain),
        "free": energies(noise_free, net.gate, brain),
        "nmse_mean": nmse(mean, truth, brain),
        "nmse_none": nmse(mixed, truth, brain),
        "nmse_network": nmse(net.finish(x, mixed, weights), truth, brain),
    }
    norm = float((truth[brain] ** 2).sum())
    row["noise removed"] = [v / norm for v in row["true"]]
    row["signal removed"] = [v / norm for v in energies(signal_removed, net.gate, brain)]
    for name, gate in variant_gates(net).items():
        sources = {"twin": noise_twin_est, "oracle": noise_true, "3 twins": [noise_twin_est, noise_free, twin_other]}
        for source, noise in sources.items():
            gains = band_gains(gate, removed, noise, head)
            out = mixed + sum(g * b for g, b in zip(gains, band_split(removed, gate)))
            key = f"{name} / {source}"
            row[f"nmse {key}"] = nmse(out, truth, brain)
            # per band: removed noise given back, and removed signal still missing, over the truth's energy
            row[f"noise back {key}"] = [
                float(((g * b)[brain] ** 2).sum()) / norm for g, b in zip(gains, band_split(noise_true, gate))
            ]
            row[f"signal lost {key}"] = [
                float((((1 - g) * b)[brain] ** 2).sum()) / norm for g, b in zip(gains, band_split(signal_removed, gate))
            ]
    return row


def summary(rows: list[dict]) -> str:
    """Markdown: per weights and gate, medians over inputs of the error and of the noise it gave back."""
    lines = [
        "| weights | step after the network | NMSE | / network alone (geo) | noise back | of it, band 0.75 "
        "| signal still lost, bands 2.5-0.75 |",
        "|---|---|---|---|---|---|---|",
    ]
    for weights in dict.fromkeys(r["weights"] for r in rows):
        sel = [r for r in rows if r["weights"] == weights]
        none = np.array([r["nmse_none"] for r in sel])
        lines.append(f"| {weights} | none | {np.median(none):.3f} | 1 | - | - | - |")
        for key in [k[5:] for k in sel[0] if k.startswith("nmse ")]:
            err = np.array([r[f"nmse {key}"] for r in sel])
            back = np.array([r[f"noise back {key}"] for r in sel])
            lost = np.array([r[f"signal lost {key}"] for r in sel])[:, :3].sum(axis=1)
            lines.append(
                f"| {weights} | {key} | {np.median(err):.3f} | {np.exp(np.mean(np.log(err / none))):.3f} "
                f"| {np.median(back.sum(axis=1)):.4f} | {np.median(back[:, 2]):.4f} | {np.median(lost):.4f} |"
            )
        ratio = np.exp(np.mean(np.log([np.divide(r["true"], r["twin"]) for r in sel]), axis=0))
        free = np.exp(np.mean(np.log([np.divide(r["true"], r["free"]) for r in sel]), axis=0))
        lines.append(
            f"\n{weights}: removed noise true / twin (geo, bands 2.5 / 1.5 / 0.75 / 0) "
            f"{' / '.join(f'{v:.2f}' for v in ratio)}; true / free {' / '.join(f'{v:.2f}' for v in free)}\n"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", action="store_true", help="print the summary of --out and stop")
    args = p.parse_args()
    if args.report:
        print(summary(json.loads(args.out.read_text())))
        return
    scans = load_scans()
    rows = []
    for label, (path, fold) in WEIGHTS.items():
        model = core.build_model(f"{label.strip()}={path}", core.INFERENCE_CONFIG)
        for series in scans:
            if not in_fold(series.name, fold):
                continue
            groups = core.groups_for(series.num_pairs // 2, args.k, args.groups + 1)
            for g, group in enumerate(groups[: args.groups]):
                row = measure(model, series, group, groups[(g + 1) % len(groups)])
                rows.append(dict(row, weights=label.strip(), scan=series.name.split("/")[1], group=g))
                r = rows[-1]
                ratio = " ".join(f"{a / b:.2f}" for a, b in zip(r["true"], r["twin"]))
                sel = " ".join(f"{a / b:.2f}" for a, b in zip(r["true"], r["free"]))
                print(
                    f"{r['weights']:10s} {r['scan']:18s} g{g} true/twin {ratio} | true/free {sel} | "
                    f"nmse none {r['nmse_none']:.3f} gate {r['nmse default / twin']:.3f} "
                    f"oracle {r['nmse default / oracle']:.3f}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(summary(rows))


if __name__ == "__main__":
    main()
