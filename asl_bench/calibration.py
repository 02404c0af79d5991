"""Calibration of the enhanced map's SD map (``asl-calibration``): does the predicted SD cover the error?

For every input (simulated splits: the first k pairs of each series, scored against the noise-free
truth; real long scans: up to ``--groups`` disjoint groups of k pairs, scored against the mean of the
pairs not used, whose own noise variance is added to the predicted variance) the shipped network and
the shipped SD estimator (the ``uncertainty`` handler of inference.json, same settings) give the
enhanced map and its SD map. Scores, pooled over the voxels of a data set and k:

- coverage: fraction of voxels with |error| <= 1.96 * sqrt(sd^2 + reference noise variance)
  (target 0.95 +- 0.03)
- mean z^2, z = error / sqrt(sd^2 + reference noise variance) (target 1 +- 0.1)

inside the brain (simulated: truth GM + WM + CSF probseg > 0.5; real: the head mask of the bundle's
normalisation), per tissue class (simulated GM probseg > 0.7, WM > 0.9) and inside the planted lesions,
with the per-series range; and a reliability diagram (predicted SD, in bins of equal voxel count,
against the observed RMS error, both with the reference's noise where there is one; errors and SDs
in the network's unit, each input's deltaM level, so that scans in different units pool). The
reference's noise variance is the unused pairs' spread over their number, averaged over the SD map's
window: per voxel it comes from few pairs (chi-square with N - k - 1 degrees of freedom), and
dividing by such a noisy variance inflates z^2 (without bound for 2 reference pairs); the voxelwise
version is scored beside (``head_voxelwise_ref_var``).

Real multi-PLD series are scored on the pairs of their longest PLD only (the pairs of one PLD are
repeats; across PLDs the signal differs, so the other pairs would be no reference).

``--fit`` fits the calibration (a, b) per k on ``--val`` (the simulated validation split: raw maps
against the truth, maximum likelihood; see :mod:`asl_enhance.uncertainty`) and prints the table that
inference.json's ``uncertainty#calibration`` holds.

Usage: asl-calibration --val data/bench_val --test data/bench_test --real .cache/real/ds000240 \
    [--real DIR ...] [--ks 2,3,4] [--out studies/uncertainty/calibration.json] \
    [--figure studies/uncertainty/reliability.png] [--fit]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from asl_enhance import uncertainty as unc

from . import core as bench

#: the SD's coverage interval: +-1.96 SD holds 95% of a Gaussian error
Z95 = 1.96
#: tissue classes of the simulated splits (probseg thresholds)
GM_THRESHOLD, WM_THRESHOLD = 0.7, 0.9
#: bins of the reliability diagram (equal voxel counts)
RELIABILITY_BINS = 12


# ------------------------------------------------------------------------------------------- data
def pair_plds(series: bench.Series) -> list[float | None]:
    """Post-labeling delay of each pair (the value of its first volume; None where the sidecar has none)."""
    sidecar = json.loads(series.item.get("sidecar_json") or "{}")
    volumes = json.loads(series.item.get("pair_volumes") or "[]")
    pld = sidecar.get("PostLabelingDelay")
    if isinstance(pld, list):
        return [float(pld[v[0]]) if v and v[0] < len(pld) else None for v in volumes]
    return [None if pld is None else float(pld)] * series.num_pairs


def single_pld(series: bench.Series) -> bench.Series:
    """The series restricted to the pairs of its longest PLD when it has several (multi-PLD); the head
    mask is rebuilt from those pairs. A single-PLD series is returned unchanged."""
    plds = pair_plds(series)
    known = {p for p in plds if p is not None}
    if len(known) <= 1:
        return series
    keep = [i for i, p in enumerate(plds) if p == max(known)]
    item = dict(series.item, pairs=np.asarray(series.item["pairs"])[keep])
    item["pair_volumes"] = json.dumps([json.loads(series.item["pair_volumes"])[i] for i in keep])
    out = bench.Series(series.name, item, series.voxel, series.brain, m0=series.m0)
    out.extra["pld"] = max(known)
    out.brain = bench.prepare(out, list(range(out.num_pairs)))["mask"][0] > 0.5
    return out


def load_real(folders: Sequence[Path], min_pairs: int = 4) -> list[bench.Series]:
    """Every series of the real data sets, one PLD each, with at least ``min_pairs`` pairs."""
    out = []
    for folder in folders:
        for s in bench.load_series(Path(folder), False, None):
            s = single_pld(s)
            if s.num_pairs >= min_pairs:
                out.append(s)
    return out


# ------------------------------------------------------------------------------------------- maps
def shipped_handler() -> unc.EnhancedSDHandler:
    """The ``uncertainty`` handler exactly as inference.json defines it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bench.INFERENCE_CONFIG))
    return parser.get_parsed_content("uncertainty", instantiate=True)


@torch.inference_mode()
def enhance_with_sd(
    model: bench.Model, handler: unc.EnhancedSDHandler, prep: dict[str, Any], pairs: np.ndarray, raw: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Enhanced map and its SD map (input units) for one prepared input, as the bundle computes them
    (head mask: the bundle's); ``raw``: the uncalibrated response SD. SD is None for a single pair."""
    d = bench.NormalizeASLd(keys=("input_mean",), layout=model.layout)(prep)
    scale = float(d["scale"])
    image = torch.as_tensor(d["image"][None])
    pred = model.net(image, torch.tensor([len(pairs)]))  # k, as the bundle's PrepareBatchExtraInput passes it
    masks = torch.as_tensor(d["mask"][None])
    sd = handler.sd_map(model.net, image, pred, [np.asarray(pairs, np.float32) / scale], raw=raw, masks=masks)
    return pred[0, 0].numpy() * scale, None if sd is None else sd[0, 0].numpy() * scale


# ---------------------------------------------------------------------------------------- scoring
def local_variance(variance: np.ndarray) -> np.ndarray:
    """The reference's noise variance averaged over the SD map's window (see
    :func:`asl_enhance.evaluation.local_reference_variance`)."""
    from asl_enhance.evaluation import local_reference_variance

    return local_reference_variance(variance)


def interval_scores(error: np.ndarray, sd: np.ndarray, ref_var: np.ndarray | float = 0.0) -> dict[str, float]:
    """Coverage of +-1.96 SD and mean z^2 (the reference's noise variance added), over the given voxels."""
    var = np.asarray(sd, np.float64) ** 2 + np.asarray(ref_var, np.float64)
    z2 = np.asarray(error, np.float64) ** 2 / np.maximum(var, 1e-30)
    if z2.size == 0:
        return {"coverage": math.nan, "mean_z2": math.nan, "voxels": 0}
    return {"coverage": float(np.mean(z2 <= Z95**2)), "mean_z2": float(z2.mean()), "voxels": int(z2.size)}


def reliability(error: np.ndarray, sd: np.ndarray, ref_var: np.ndarray, bins: int = RELIABILITY_BINS) -> dict:
    """Predicted RMS (sqrt of the mean of sd^2 + reference variance) against observed RMS error, in bins
    of predicted SD with equal voxel counts."""
    predicted = np.sqrt(np.asarray(sd, np.float64) ** 2 + ref_var)
    order = np.argsort(predicted)
    chunks = np.array_split(order, bins)
    return {
        "predicted_rms": [float(np.sqrt(np.mean(predicted[c] ** 2))) for c in chunks],
        "observed_rms": [float(np.sqrt(np.mean(np.asarray(error, np.float64)[c] ** 2))) for c in chunks],
    }


class Pool:
    """Voxels of one data set and k: errors, SDs, reference variances and region labels."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.series_scores: list[dict[str, Any]] = []

    def add(self, name: str, error, sd, ref_var, regions: dict[str, np.ndarray], ref_var_voxelwise=None) -> None:
        """One input's voxels; ``ref_var_voxelwise`` (real data): the reference variance before the
        local average, scored beside as ``<region>_voxelwise_ref_var``."""
        parts = {"error": error, "sd": sd, "ref_var": ref_var, **regions}
        if ref_var_voxelwise is not None:
            parts["ref_var_voxelwise"] = ref_var_voxelwise
        for key, value in parts.items():
            self.parts.setdefault(key, []).append(np.asarray(value))
        self.series_scores.append({"series": name, **interval_scores(error, sd, ref_var)})

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}

    def summary(self) -> dict[str, Any]:
        a = self.arrays()
        out: dict[str, Any] = {}
        for region in [r for r in a if r not in ("error", "sd", "ref_var", "ref_var_voxelwise")]:
            sel = a[region].astype(bool)
            out[region] = interval_scores(a["error"][sel], a["sd"][sel], a["ref_var"][sel])
            if "ref_var_voxelwise" in a:
                voxelwise = a["ref_var_voxelwise"][sel]
                out[f"{region}_voxelwise_ref_var"] = interval_scores(a["error"][sel], a["sd"][sel], voxelwise)
        coverages = [s["coverage"] for s in self.series_scores]
        z2 = [s["mean_z2"] for s in self.series_scores]
        out["per_series"] = {
            "n": len(self.series_scores),
            "coverage_range": [float(np.min(coverages)), float(np.max(coverages))],
            "mean_z2_range": [float(np.min(z2)), float(np.max(z2))],
            "mean_z2_median": float(np.median(z2)),
        }
        out["reliability"] = reliability(a["error"], a["sd"], a["ref_var"])
        return out


def scored_inputs(
    series: list[bench.Series], k: int, groups: int
) -> Iterator[tuple[bench.Series, list[int], dict[str, Any]]]:
    """Each input of a data set at k, prepared: simulated, the first k pairs; real, up to ``groups``
    disjoint groups, if at least 2 pairs are left for the reference (one pair has no variance estimate)."""
    for s in series:
        simulated = s.truth is not None
        for group in bench.groups_for(s.num_pairs, k, 1 if simulated else groups):
            if not simulated and s.num_pairs - k < 2:
                continue
            yield s, list(group), bench.prepare(s, group)


def score_set(
    label: str,
    series: list[bench.Series],
    ks: Sequence[int],
    model: bench.Model,
    handler: unc.EnhancedSDHandler,
    groups: int,
    log,
) -> dict[int, Pool]:
    """Pools per k of one data set (simulated: first k pairs against the truth; real: disjoint groups
    against the other pairs)."""
    simulated = series[0].truth is not None if series else False
    pools: dict[int, Pool] = {}
    for k in ks:
        start = time.perf_counter()
        pool = Pool()
        for s, group, prep in scored_inputs(series, k, groups):
            pred, sd = enhance_with_sd(model, handler, prep, np.asarray(s.item["pairs"])[group])
            if sd is None:
                continue
            mask = s.brain
            if simulated:
                error, ref_var = (pred - s.truth)[mask], np.zeros(int(mask.sum()))
                regions = {
                    "brain": np.ones(int(mask.sum()), bool),
                    "gm": s.tissues["GM"][mask] > GM_THRESHOLD,
                    "wm": s.tissues["WM"][mask] > WM_THRESHOLD,
                    "lesion": (s.lesion if s.lesion is not None else np.zeros_like(mask))[mask],
                }
            else:
                error, voxelwise = (pred - prep["other_mean"])[mask], prep["target_noise_var"][mask]
                ref_var = local_variance(prep["target_noise_var"])[mask]
                regions = {"head": np.ones(int(mask.sum()), bool)}
            name = f"{s.name} {'-'.join(map(str, group))}"
            # the network's unit (deltaM level of the input): scans in different units pool fairly
            unit = float(prep["scale"])
            voxelwise = None if simulated else voxelwise / unit**2
            pool.add(name, error / unit, sd[mask] / unit, ref_var / unit**2, regions, voxelwise)
        if pool.series_scores:
            pools[k] = pool
            log(f"{label} k={k}: {len(pool.series_scores)} inputs in {time.perf_counter() - start:.0f}s")
    return pools


def fit_ab(
    error: np.ndarray,
    raw: np.ndarray,
    head: np.ndarray,
    ref_var: np.ndarray | float = 0.0,
    weight: np.ndarray | float = 1.0,
) -> tuple[float, float]:
    """(a, b) of var = a^2 raw^2 + b^2 head^2 by the Gaussian likelihood of ``error`` (at the optimum
    the mean z^2 is 1: scaling a and b together is one direction of the fit). Real scans: ``ref_var``
    is the leave-out reference's own noise variance (known, added); ``weight`` per voxel."""
    from scipy.optimize import minimize

    e2, r2, h2 = (np.asarray(v, np.float64) ** 2 for v in (error, raw, head))
    rv = np.broadcast_to(np.asarray(ref_var, np.float64), e2.shape)
    w = np.broadcast_to(np.asarray(weight, np.float64), e2.shape)

    def nll(p: np.ndarray) -> float:
        var = np.maximum(np.exp(2 * p[0]) * r2 + np.exp(2 * p[1]) * h2 + rv, 1e-30)
        return float(np.sum(w * (np.log(var) + e2 / var)) / np.sum(w))

    best = minimize(nll, np.log([1.5, 1.0]), method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-9})
    return float(np.exp(best.x[0])), float(np.exp(best.x[1]))


def raw_inputs(series: list[bench.Series], k: int, model, handler, groups: int) -> list[dict[str, Any]]:
    """Per input, inside the brain, in the network's unit: the error (simulated: against the truth;
    real: against the unused pairs' mean), the raw map, its head RMS and the reference's variance."""
    out = []
    for s, group, prep in scored_inputs(series, k, groups):
        simulated = s.truth is not None
        pred, raw = enhance_with_sd(model, handler, prep, np.asarray(s.item["pairs"])[group], raw=True)
        if raw is None:
            continue
        unit, mask = float(prep["scale"]), s.brain
        head = float(np.sqrt(np.mean(raw[prep["mask"][0] > 0.5].astype(np.float64) ** 2)))
        reference = s.truth if simulated else prep["other_mean"]
        ref_var = np.zeros(int(mask.sum())) if simulated else local_variance(prep["target_noise_var"])[mask]
        out.append(
            {
                "series": s.name,
                "error": (pred - reference)[mask] / unit,
                "raw": raw[mask] / unit,
                "head": np.full(int(mask.sum()), head / unit),
                "ref_var": ref_var / unit**2,
            }
        )
    return out


def fit_inputs(*sets: list[dict]) -> tuple[float, float]:
    """(a, b) on the inputs of one or more data sets together, each set weighing the same (voxel
    weights 1 / the set's voxel count)."""
    keys = ("error", "raw", "head", "ref_var")
    items, weights = [], []
    for inputs in sets:
        voxels = sum(len(i["error"]) for i in inputs)
        items += inputs
        weights += [np.full(len(i["error"]), 1.0 / voxels) for i in inputs]
    return fit_ab(*(np.concatenate([i[key] for i in items]) for key in keys), np.concatenate(weights))


def calibrated_sd(item: dict, a: float, b: float) -> np.ndarray:
    """One input's calibrated SD, sqrt(a^2 raw^2 + b^2 head^2), from its raw map and head RMS."""
    return np.sqrt(a * a * item["raw"] ** 2 + b * b * item["head"] ** 2)


def pooled_scores(inputs: list[dict], sds: list[np.ndarray]) -> dict[str, float]:
    """Coverage and mean z^2 of inputs with their SD maps, the reference's variance added."""
    error = np.concatenate([i["error"] for i in inputs])
    return interval_scores(error, np.concatenate(sds), np.concatenate([i["ref_var"] for i in inputs]))


def calibrated_scores(inputs: list[dict], a: float, b: float) -> dict[str, float]:
    """Coverage and mean z^2 of inputs under (a, b), the reference's variance added."""
    return pooled_scores(inputs, [calibrated_sd(i, a, b) for i in inputs])


def fit_calibration(
    series: list[bench.Series],
    ks: Sequence[int],
    model,
    handler,
    log,
    real: list[bench.Series] | None = None,
    groups: int = 4,
) -> dict[int, list[float]]:
    """(a, b) per k on the simulated validation split (first k pairs, against the truth) and, with
    ``real``, on the real long scans too (against the unused pairs, their own variance added; each data
    set weighs half). With real scans, each real scan is also left out in turn and the fit on the rest
    scored on it: the coverage a scan never seen by the fit gets (logged, returned under ``"cv"``)."""
    table: dict = {}
    for k in ks:
        sim = raw_inputs(series, k, model, handler, 1)
        if not sim:
            continue
        rows = raw_inputs(real, k, model, handler, groups) if real else []
        a, b = fit_inputs(sim, rows) if rows else fit_inputs(sim)
        table[k] = [round(a, 3), round(b, 3)]
        log(f"fit k={k}: a {a:.3f}, b {b:.3f} on {len(sim)} simulated + {len(rows)} real inputs")
        if rows:
            per_scan, held, sds = {}, [], []
            for name in dict.fromkeys(i["series"] for i in rows):
                fa, fb = fit_inputs(sim, [i for i in rows if i["series"] != name])
                inputs = [i for i in rows if i["series"] == name]
                per_scan[name] = calibrated_scores(inputs, fa, fb) | {"a": fa, "b": fb}
                held += inputs
                sds += [calibrated_sd(i, fa, fb) for i in inputs]
            pooled = pooled_scores(held, sds)
            table.setdefault("cv", {})[k] = {**pooled, "per_scan": per_scan}
            log(f"  leave one real scan out, k={k}: cov {pooled['coverage']:.3f} z2 {pooled['mean_z2']:.2f}")
    return table


# ----------------------------------------------------------------------------------------- figure
def reliability_figure(results: dict[str, dict[int, dict]], path: Path) -> None:
    """One panel per data set: predicted against observed RMS error per k, log-log, identity dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sets = [name for name in results if results[name]]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.0 * len(sets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], sets):
        lows, highs = [], []
        for k, summary in sorted(results[name].items()):
            rel = summary["reliability"]
            region = "brain" if "brain" in summary else "head"
            ax.plot(
                rel["predicted_rms"],
                rel["observed_rms"],
                "o-",
                ms=3,
                label=f"k={k}: cov {summary[region]['coverage']:.3f}, z2 {summary[region]['mean_z2']:.2f}",
            )
            lows.append(min(rel["predicted_rms"] + rel["observed_rms"]))
            highs.append(max(rel["predicted_rms"] + rel["observed_rms"]))
        lo, hi = min(lows) * 0.8, max(highs) * 1.25
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("predicted RMS error (SD map" + (")" if name != "real" else " + reference noise)"))
        ax.set_ylabel("observed RMS error")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"SD map reliability: {RELIABILITY_BINS} bins of equal voxel count per k "
        "(units: each input's deltaM level, the network's unit)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", type=Path, default=None, help="simulated validation split (fits with --fit)")
    parser.add_argument("--test", type=Path, default=None, help="simulated test split")
    parser.add_argument("--real", type=Path, action="append", default=[], help="real BIDS-ASL long scans")
    parser.add_argument("--ks", default="2,3,4", help="input pairs k (comma-separated)")
    parser.add_argument("--groups", type=int, default=4, help="real: disjoint input groups per series and k")
    parser.add_argument("--limit", type=int, default=None, help="series per simulated split (default all)")
    parser.add_argument(
        "--model", action="append", default=None, help="NAME=weights.pt[:config.json...] (default: shipped)"
    )
    parser.add_argument("--fit", action="store_true", help="fit the factor per k on --val (raw maps) and print it")
    parser.add_argument(
        "--fit_real",
        action="store_true",
        help="with --fit: fit on --val and the --real scans together (and cross-validate)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--figure", type=Path, default=None, help="reliability diagram PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {text}", flush=True)

    ks = [int(v) for v in args.ks.split(",")]
    model = bench.build_models(args.model)[0]
    handler = shipped_handler()
    if args.fit:
        if args.val is None:
            raise SystemExit("--fit needs --val (the simulated validation split)")
        real = load_real(args.real) if args.fit_real else None
        handler.single_pair = handler.single_pair or 1 in ks  # a k = 1 fit needs the single-pair draw
        table = fit_calibration(
            bench.load_series(args.val, True, args.limit), ks, model, handler, log, real, args.groups
        )
        cv = table.pop("cv", None)
        print(json.dumps({"calibration": {str(k): v for k, v in table.items()}}))
        if args.out and cv is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            command = "asl-calibration " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
            document = {"command": command, "calibration": table, "leave_one_real_scan_out": cv}
            args.out.write_text(json.dumps(document, indent=1) + "\n")
        return
    sets: dict[str, list[bench.Series]] = {}
    if args.val:
        sets["val"] = bench.load_series(args.val, True, args.limit)
    if args.test:
        sets["test"] = bench.load_series(args.test, True, args.limit)
    if args.real:
        sets["real"] = load_real(args.real)
    log("loaded " + ", ".join(f"{len(v)} {k}" for k, v in sets.items()) + " series")
    results: dict[str, dict[int, dict]] = {}
    for label, series in sets.items():
        pools = score_set(label, series, ks, model, handler, args.groups, log)
        results[label] = {k: pool.summary() for k, pool in pools.items()}
        if label == "real":
            for k, pool in pools.items():
                results[label][k]["per_input"] = pool.series_scores
    for label, by_k in results.items():
        for k, summary in by_k.items():
            regions = [r for r in ("brain", "gm", "wm", "lesion", "head") if r in summary]
            text = "; ".join(f"{r} cov {summary[r]['coverage']:.3f} z2 {summary[r]['mean_z2']:.2f}" for r in regions)
            print(f"{label:5} k={k}: {text} (per input z2 {summary['per_series']['mean_z2_range']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "command": "asl-calibration " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
            "estimator": handler.settings(),
            "real_series": [
                s.name + (f" (PLD {s.extra['pld']} s only)" if "pld" in s.extra else "") for s in sets.get("real", [])
            ],
            "results": {label: {str(k): v for k, v in by_k.items()} for label, by_k in results.items()},
            "seconds": round(time.perf_counter() - start, 1),
        }
        args.out.write_text(json.dumps(document, indent=1) + "\n")
    if args.figure:
        reliability_figure(results, args.figure)
    log("done")


if __name__ == "__main__":
    main()
