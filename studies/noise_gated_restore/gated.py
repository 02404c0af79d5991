"""Noise-gated restore against the fixed one, on real long scans with planted lesions (issue 17).

The network's proposal (mix of blurs + residual) is computed once per input; every variant of the step
after it (none, fixed Gaussian restore, band-wise noise gate) is applied to that proposal, so a sweep
costs one network pass per input. Lesions, groups and seeds are the benchmark's (asl_bench.fidelity),
so the numbers line up with ``asl-benchmark --fidelity``. Writes ``rows.json`` and prints medians.

    python studies/noise_gated_restore/gated.py --out studies/noise_gated_restore/sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from asl_enhance.adaptation import adapt_network
from asl_enhance.metrics import nmse
from asl_enhance.networks import GaussianSmooth, NoiseGatedRestore, head_mean
from asl_enhance.transforms import NormalizeASLd

from asl_bench import core
from asl_bench import fidelity as fd

FINE = [[1.5, 1.5, 0.75], [0.75, 0.75, 0.4], [0, 0, 0]]
MW3 = [3, 3, 1.5]


def gate(bands, alpha=None, **extra) -> dict:
    return {"bands": bands, "gate": dict(extra, **({"alpha": alpha} if alpha is not None else {}))}


#: every variant measured (names: gate<band widths>, "fix" = first band given back whole (alpha 0),
#: "+fine" = the 0.75 and single-voxel bands too, a = alpha per band, mw3 = smallest window 3/3/1.5,
#: w3 / ws1 = window 3x / 1x the band's width)
VARIANTS: dict[str, dict] = {
    "none": {},
    "fixed1.5 (0.7.0)": {"sigma": [1.5, 1.5, 0.75]},
    "fixed2": {"sigma": [2, 2, 1]},
    "gate1.5": gate([[1.5, 1.5, 0.75]]),
    "gate1.0": gate([[1.0, 1.0, 0.5]]),
    "gate0.75": gate([[0.75, 0.75, 0.4]]),
    "gate1.5,0.75": gate(FINE[:2]),
    "gate1.5,0.75 a1,2": gate(FINE[:2], [1, 2]),
    "gate1.5,0.75 mw3": gate(FINE[:2], min_window=MW3),
    "gate1.5,0.75 ws1": gate(FINE[:2], window_scale=1.0),
    "gate1.5+fine": gate(FINE),
    "gate1.5+fine a1.5": gate(FINE, 1.5),
    "gate1.5+fine a2": gate(FINE, 2.0),
    "gate1.5+fine w3": gate(FINE, window_scale=3.0),
    "gate1.5+fine a1,1,2": gate(FINE, [1, 1, 2]),
    "gate1.5+fine a1,1,3": gate(FINE, [1, 1, 3]),
    "gate1.5+fine a1,1.5,3": gate(FINE, [1, 1.5, 3]),
    "gate1.5+fine a1,2,3": gate(FINE, [1, 2, 3]),
    "gate1.5+fine a1,2,4": gate(FINE, [1, 2, 4]),
    "gate1.5+fine a1,3,3": gate(FINE, [1, 3, 3]),
    "gate1.5+fine a1,1,3 mw3": gate(FINE, [1, 1, 3], min_window=MW3),
    "gate1.5+fine a1,1,4 mw3": gate(FINE, [1, 1, 4], min_window=MW3),
    "gate3+fine": gate([[3, 3, 1.5]] + FINE),
    "gate3,1.5,.75 a1,1,2": gate([[3, 3, 1.5]] + FINE[:2], [1, 1, 2]),
    "gate3fix,1.5,.75": gate([[3, 3, 1.5]] + FINE[:2], [0, 1, 1]),
    "gate2.5fix,1.5,.75": gate([[2.5, 2.5, 1.25]] + FINE[:2], [0, 1, 1]),
    "gate2fix,1,.5": gate([[2, 2, 1], [1, 1, 0.5], [0.5, 0.5, 0.25]], [0, 1, 1]),
    "gate3fix+fine a0,1,1,3": gate([[3, 3, 1.5]] + FINE, [0, 1, 1, 3]),
    "gate3fix+fine a0,1,1,3 mw3": gate([[3, 3, 1.5]] + FINE, [0, 1, 1, 3], min_window=MW3),
    "gate3fix+fine a0,1,1,4 mw3": gate([[3, 3, 1.5]] + FINE, [0, 1, 1, 4], min_window=MW3),
    "gate2.5fix+fine a0,1,1,2 mw3": gate([[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 2], min_window=MW3),
    "gate2.5fix+fine a0,1,1,3 mw3 (0.8.0)": gate([[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3),
    "exact gate2.5fix+fine a0,1,1,3 mw3": dict(
        gate([[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3), exact=True
    ),
    "exact gate2.5fix+fine a0,1,1,1 mw3": dict(
        gate([[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 1], min_window=MW3), exact=True
    ),
    "exact gate1.5+fine a1,1,3 mw3": dict(gate(FINE, [1, 1, 3], min_window=MW3), exact=True),
    "exact gate1.5+fine a1,1,1 mw3": dict(gate(FINE, [1, 1, 1], min_window=MW3), exact=True),
    "gate2.5fix,1.25,.6,0 a0,1,1,3 mw3": gate(
        [[2.5, 2.5, 1.25], [1.25, 1.25, 0.6], [0.6, 0.6, 0.3], [0, 0, 0]], [0, 1, 1, 3], min_window=MW3
    ),
    **{
        f"0.8.0 + fixed floor {f}": gate([[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3, fixed_floor=f)
        for f in ([0, 0.2, 0.2, 0], [0, 0.35, 0.35, 0], [0, 0.5, 0.5, 0], [0, 0.35, 0.35, 0.15], [0, 0.5, 0.5, 0.25])
    },
    **{
        f"0.8.0 + scan floor {c:g}" + (" (0.9.0)" if c == 1 else ""): gate(
            [[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3, scan_floor=c
        )
        for c in (0.5, 1, 1.25, 1.5, 2)
    },
    **{
        f"gate a{','.join(map(str, a))} + scan floor {c:g}": gate(
            [[2.5, 2.5, 1.25]] + FINE, a, min_window=MW3, scan_floor=c
        )
        for a in ([1, 1, 1, 3], [0.5, 1, 1, 3])
        for c in (1, 1.5)
    },
    **{
        f"0.8.0 + fixed floor {f} + scan floor {c:g}": gate(
            [[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3, fixed_floor=f, scan_floor=c
        )
        for f, c in (([0, 0, 0.3, 0], 1.5), ([0, 0.2, 0.2, 0], 1), ([0, 0, 0.3, 0], 1), ([0, 0.15, 0.3, 0], 1))
    },
    "gate2fix,1,.5,0 a0,1,1,3 mw3": gate(
        [[2, 2, 1], [1, 1, 0.5], [0.5, 0.5, 0.25], [0, 0, 0]], [0, 1, 1, 3], min_window=MW3
    ),
    **{
        f"0.9.0 + band test {t:g}" + (" + level" if level else ""): gate(
            [[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3, scan_floor=1, band_test=t, keep_level=level
        )
        for t, level in ((1.25, False), (1.25, True), (1.5, True), (2, True))
    },
    **{
        f"0.9.0 + coarse test {t:g} + level": gate(
            [[2.5, 2.5, 1.25]] + FINE,
            [0, 1, 1, 3],
            min_window=MW3,
            scan_floor=1,
            band_test=t,
            keep_level=True,
            test_whole_only=True,
        )
        for t in (1.25, 2, 4)
    },
    **{
        f"0.9.0 + global test {t:g}" + (" + level" if level else ""): gate(
            [[2.5, 2.5, 1.25]] + FINE,
            [0, 1, 1, 3],
            min_window=MW3,
            scan_floor=1,
            band_test=t,
            keep_level=level,
            global_test=True,
        )
        for t, level in ((2, True), (4, True), (8, True), (4, False))
    },
    "0.9.0 + scan test 4 (option)": gate(
        [[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3, scan_floor=1, scan_test=4
    ),
    **{
        f"0.9.0, alpha {a}": gate([[2.5, 2.5, 1.25]] + FINE, list(a), min_window=MW3, scan_floor=1)
        for a in ((0, 1.25, 1, 3), (0, 1.5, 1, 3), (0, 1.5, 1.5, 3))
    },
    "0.9.0 + level": gate([[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3, scan_floor=1, keep_level=True),
    **{
        f"0.9.0 + twin test {lo:g}-{hi:g}" + (" (0.10.0)" if lo == 16 else ""): gate(
            [[2.5, 2.5, 1.25]] + FINE, [0, 1, 1, 3], min_window=MW3, scan_floor=1, twin_test=(lo, hi)
        )
        for lo, hi in ((4, 8), (8, 16), (16, 32))
    },
}


class BandTestGate(NoiseGatedRestore):
    """The gate after a scan-level test per band (measured, not adopted): S = the band energy of the input
    (the k-pair mean) over its twin's, summed over the head; each band's gains are scaled by
    clamp((S - 1) / (band_test - 1), 0, 1), so a band where the scan shows no perfusion at all closes
    (``test_whole_only``: only the bands given back whole, alpha 0). ``keep_level`` adds back, as a constant,
    the head mean the gate kept out, so a closed coarse band cannot let the network move the level."""

    def __init__(self, *args, band_test=0.0, keep_level=False, test_whole_only=False, global_test=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.band_test, self.keep_level, self.test_whole_only = float(band_test), keep_level, test_whole_only
        self.global_test = global_test  # every band takes the coarsest band's share: the scan-level test
        self.signal: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, twin), set before each call
        self.shares: list[torch.Tensor] = []  # this call's share per band, set by forward

    def forward(self, removed, noise, head=None):
        shares = self.band_shares(head) if self.band_test > 1 else [torch.ones(())] * len(self.blurs)
        self.shares = [shares[0]] * len(shares) if self.global_test else shares
        restored = super().forward(removed, noise, head)
        if self.keep_level:
            restored = restored + head_mean(removed - restored, head)
        return restored

    def band_gain(self, band, energy_r, energy_n, head):
        """The shipped gain (floor included), then the scan-level test's share of the band."""
        gain = super().band_gain(band, energy_r, energy_n, head)
        return gain * self.shares[band] if self.alphas[band] == 0 or not self.test_whole_only else gain

    def band_shares(self, head) -> list[torch.Tensor]:
        signal, twin = self.signal
        shares, coarser_s, coarser_t = [], torch.zeros_like(signal), torch.zeros_like(twin)
        for blur in self.blurs:
            s, t = blur(signal), blur(twin)
            ratio = head_mean((s - coarser_s) ** 2, head) / head_mean((t - coarser_t) ** 2, head).clamp_min(1e-12)
            shares.append(torch.clamp((ratio - 1.0) / (self.band_test - 1.0), 0.0, 1.0))
            coarser_s, coarser_t = s, t
        return shares


class FixedFloorGate(NoiseGatedRestore):
    """The gate with a fixed floor per band (gain = f + (1 - f) g): measured, not adopted (it returns the
    same share of noise at every SNR; the shipped floor follows the scan's median gain)."""

    def __init__(self, *args, fixed_floor, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed = [float(f) for f in fixed_floor]

    def local_gain(self, band, energy_r, energy_n):
        return self.fixed[band] + (1.0 - self.fixed[band]) * super().local_gain(band, energy_r, energy_n)


def set_variant(net, variant: dict) -> None:
    sigma = variant.get("sigma", [0, 0, 0])
    net.restore = GaussianSmooth(3, sigma)
    bands = variant.get("bands")  # with a twin; without one (k = 1) the fixed sigma (none here)
    options = dict(variant.get("gate", {}))
    net.scan_test = float(options.pop("scan_test", 0.0))  # the bundle's scan test (restore_scan_test), off unless asked
    kind = (
        FixedFloorGate
        if "fixed_floor" in options
        else BandTestGate
        if {"band_test", "keep_level"} & set(options)
        else NoiseGatedRestore
    )
    net.gate = kind(3, bands, **options) if bands else None


def finish_exact(net, x: torch.Tensor, mixed: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """As the network's finish, but the removed noise is the twin minus the whole proposal's response to
    it (a finite difference through the backbone: one more pass), not only the mix of its blurs."""
    mean, twin = x[:, :1], x[:, net.twin_channel : net.twin_channel + 1]
    plus = x.clone()
    plus[:, :1] += eps * twin
    twin_removed = twin - (net.mix(plus)[0] - mixed) / eps
    out = mixed + net.gate(mean - mixed, twin_removed)
    limit = net.noise_bound * net.local_noise_sd(x)
    return mean + torch.maximum(torch.minimum(out - mean, limit), -limit)


def adapted(model: core.Model, item: dict, group: list[int], steps: int) -> core.Model:
    """The model with its network adapted to the input pairs as the bundle's ScanAdaptation does (k >= 2)."""
    if steps <= 0 or len(group) < 2:
        return model
    set_variant(model.net, VARIANTS["0.8.0 + scan floor 1 (0.9.0)"])  # adapted through the default, as the bundle does
    net = adapt_network(model.net, item["pairs"][group], item["guide"], steps, layout=model.layout)
    return dataclasses.replace(model, net=net)


@torch.inference_mode()
def outputs(model: core.Model, prep: dict, variants: dict[str, dict]) -> dict[str, np.ndarray]:
    d = NormalizeASLd(keys=("input_mean",), layout=model.layout)(prep)
    x = torch.as_tensor(d["image"][None])
    mixed, weights = model.net.mix(x)
    has_twin = bool(x[:, model.net.twin_channel + 1].mean() > 0.5)
    out = {}
    for name, variant in variants.items():
        set_variant(model.net, variant)
        if isinstance(model.net.gate, BandTestGate):
            tw = model.net.twin_channel
            model.net.gate.signal = (x[:, :1], x[:, tw : tw + 1])
        if variant.get("exact") and has_twin:
            out[name] = finish_exact(model.net, x, mixed)[0, 0].numpy() * float(d["scale"])
        else:
            out[name] = model.net.finish(x, mixed, weights)[0, 0].numpy() * float(d["scale"])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="network=asl_bundle/models/model.pt")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--out", type=Path, default=None, help="rows JSON (required unless --report)")
    p.add_argument("--report", type=Path, default=None, help="print the tables of an earlier rows JSON and stop")
    p.add_argument("--versus", default=None, help="also print each method's per-scan NMSE over this method's")
    p.add_argument("--sim_dir", type=Path, default=None, help="simulated series: NMSE against the truth")
    p.add_argument(
        "--adapt_steps", type=int, default=0, help="per-input Noise2Noise adaptation first (the bundle's --adapt_steps)"
    )
    args = p.parse_args()
    if args.report:
        report(json.loads(args.report.read_text()), args.ks, args.versus)
        return
    if args.out is None:
        p.error("--out is required")
    variants = {k: v for k, v in VARIANTS.items() if args.variants is None or k in args.variants}
    model = core.build_model(args.model, core.INFERENCE_CONFIG)
    series = fd.study_series()
    opts = fd.Options()
    rows = []
    for si, s in enumerate(series):
        start = time.perf_counter()
        gm, wm = fd.quantile_masks(s.item["pairs"].mean(axis=0), s.brain)
        for g in fd.planted_groups(s, si, args.ks, opts):
            prep, prep_l = core.prepare(s, g.group), core.prepare(g.planted, g.group)
            plain = outputs(adapted(model, s.item, g.group, args.adapt_steps), prep, variants)
            lesioned = outputs(adapted(model, g.planted.item, g.group, args.adapt_steps), prep_l, variants)
            fd.add_gaussian_curve(plain, lesioned, prep, prep_l, s.voxel)  # the benchmark's Gaussian curve
            for name, out in plain.items():
                row = {"scan": s.name, "k": g.k, "group": g.index, "method": name}
                row.update(fd.planted_scores(out, lesioned[name], prep, g, gm, wm, s.brain))
                rows.append(row)
        prep = core.prepare(s, list(range(s.num_pairs)))
        for name, out in outputs(model, prep, variants).items():
            row = {"scan": s.name, "k": s.num_pairs, "group": "all", "method": name}
            row.update(fd.no_harm(prep["input_mean"], out, gm, wm))
            rows.append(row)
        print(f"{s.name}: {time.perf_counter() - start:.0f}s", flush=True)
    if args.sim_dir:
        rows += simulated(model, args.sim_dir, args.ks, variants)
    args.out.write_text(json.dumps(rows, indent=1))
    report(rows, args.ks, args.versus)


def simulated(model: core.Model, sim_dir: Path, ks, variants: dict[str, dict]) -> list[dict]:
    """NMSE against the noise-free truth on simulated subjects (first k pairs as input)."""
    rows = []
    for s in core.load_series(sim_dir, True, None):
        for k in ks:
            prep = core.prepare(s, list(range(k)))
            outs = outputs(model, prep, variants)
            for w in fd.GAUSS_WIDTHS:
                outs[f"gauss_{w:g}"] = fd.gaussian_curve_fn(w, s.voxel)(prep)
            for name, out in outs.items():
                rows.append(
                    {"scan": s.name, "k": k, "group": "sim", "method": name, "nmse": nmse(out, s.truth, s.brain)}
                )
    return rows


def per_scan(rows: list[dict], scans: list[str], method: str) -> dict[str, float]:
    """Each scan's median NMSE over its input groups."""
    return {s: float(np.median([r["nmse"] for r in rows if r["scan"] == s and r["method"] == method])) for s in scans}


def report(rows: list[dict], ks, versus: str | None = None) -> None:
    cols = ["cr_hypo_r5", "cr_hypo_r2.5", "cr_hyper_r3.5", "removed", "nmse"]
    for k in ks:
        kr = [r for r in rows if r["k"] == k and r["group"] not in ("all", "sim")]
        methods = list(dict.fromkeys(r["method"] for r in kr))
        print(f"\nk = {k}: method | " + " | ".join(cols) + " | scans <= best Gaussian | within 5%")
        scans = list(dict.fromkeys(r["scan"] for r in kr))

        gauss = [per_scan(kr, scans, m) for m in methods if m.startswith("gauss_")]
        best = {s: min(g[s] for g in gauss) for s in scans}  # the best width for each scan (median over groups)
        for m in methods:
            mr = [r for r in kr if r["method"] == m]
            med = [np.nanmedian([r[c] for r in mr]) for c in cols]
            per = per_scan(kr, scans, m)
            wins = sum(per[s] <= best[s] for s in scans)
            near = sum(per[s] <= 1.05 * best[s] for s in scans)
            print(f"{m} | " + " | ".join(f"{v:.3f}" for v in med) + f" | {wins}/{len(scans)} | {near}/{len(scans)}")
        if versus in methods:
            print(f"\nk = {k}: per-scan NMSE over {versus}'s: method | geometric mean | scans higher")
            base = per_scan(kr, scans, versus)
            for m in methods:
                ratio = np.array([per_scan(kr, scans, m)[s] / base[s] for s in scans])
                print(f"{m} | {np.exp(np.mean(np.log(ratio))):.3f} | {int(np.sum(ratio > 1.005))}/{len(scans)}")
    for k in ks:
        sr = [r for r in rows if r["k"] == k and r["group"] == "sim"]
        if sr:
            print(
                f"\nsimulated k = {k}: "
                + ", ".join(
                    f"{m} {np.median([r['nmse'] for r in sr if r['method'] == m]):.4f}"
                    for m in dict.fromkeys(r["method"] for r in sr)
                )
            )
    nr = [r for r in rows if r["group"] == "all"]
    print("\nall pairs: method | GM change | WM change | ok")
    for m in dict.fromkeys(r["method"] for r in nr):
        mr = [r for r in nr if r["method"] == m]
        gmc = np.median([r["noharm_gm_change"] for r in mr])
        wmc = np.median([r["noharm_wm_change"] for r in mr])
        print(f"{m} | {gmc:+.3f} | {wmc:+.3f} | {int(sum(r['noharm_ok'] for r in mr))}/{len(mr)}")


if __name__ == "__main__":
    main()
