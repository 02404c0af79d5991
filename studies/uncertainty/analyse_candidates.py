"""Score the SD candidates saved by ``candidates.py``: calibration fitted on the validation split only.

For each candidate and k: the factor c that makes the mean z^2 one on the validation split
(z = error / sqrt(c^2 sd^2 + reference noise variance)); then on every set: coverage of +-1.96 SD,
mean z^2, the Gaussian negative log-likelihood (proper: rewards maps that are both calibrated and
sharp; lower is better), the reliability spread (largest |log2(observed RMS / predicted RMS)| over
ten bins of predicted SD) and, simulated, the factor the raw map needs to match the noise part of
the error alone (1 = the map is the network's noise response exactly), also per series. A
per-attenuation-bin factor (attenuation = candidate SD / input noise SD, six bins by validation
quantiles) is scored beside, and the calibrations (global, attenuation bins, and var = a^2 sd^2 +
b^2 f^2 with f the input noise SD, the map's own RMS over the scan (``noise_plus_scan``: the shipped
form, here over the scored brain voxels instead of the head mask), the enhanced map's local detail or
its local level; the last two where candidates.py saved those features) are cross-validated by
series on the validation split (two folds).

Usage: python studies/uncertainty/analyse_candidates.py --fit .cache/uncertainty/val.npz \
    --score val=.cache/uncertainty/val.npz real=.cache/uncertainty/real.npz --out studies/uncertainty/candidates.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BINS = 10
ATT_BINS = 6


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def fields(data: dict, k: int) -> dict[str, np.ndarray]:
    prefix = f"k{k}_"
    return {key[len(prefix) :]: value for key, value in data.items() if key.startswith(prefix)}


def scores(error: np.ndarray, sd: np.ndarray, ref_var: np.ndarray) -> dict[str, float]:
    var = np.maximum(sd.astype(np.float64) ** 2 + ref_var, 1e-20)
    z2 = error.astype(np.float64) ** 2 / var
    edges = np.quantile(np.sqrt(var), np.linspace(0, 1, BINS + 1))
    which = np.clip(np.searchsorted(edges, np.sqrt(var), side="right") - 1, 0, BINS - 1)
    ratios = []
    for b in range(BINS):
        sel = which == b
        if sel.sum() > 50:
            ratios.append(float(np.sqrt(np.mean(error[sel].astype(np.float64) ** 2) / np.mean(var[sel]))))
    return {
        "coverage": float(np.mean(z2 <= 1.96**2)),
        "mean_z2": float(z2.mean()),
        "nll": float(0.5 * np.mean(np.log(2 * np.pi * var) + z2)),
        "reliability_max_log2": float(np.max(np.abs(np.log2(ratios)))),
        "bin_ratios": [round(r, 3) for r in ratios],
    }


def fit_global(error: np.ndarray, sd: np.ndarray) -> float:
    return float(np.sqrt(np.mean(error.astype(np.float64) ** 2 / np.maximum(sd.astype(np.float64) ** 2, 1e-20))))


def fit_bins(error, sd, att) -> tuple[list[float], list[float]]:
    edges = list(np.quantile(att, np.linspace(0, 1, ATT_BINS + 1))[1:-1])
    which = np.searchsorted(edges, att)
    factors = [fit_global(error[which == b], sd[which == b]) for b in range(ATT_BINS)]
    return edges, factors


def apply_bins(sd, att, edges, factors) -> np.ndarray:
    return sd * np.asarray(factors)[np.searchsorted(edges, att)]


def fit_combo(error, sd, sd_in) -> tuple[float, float]:
    """(a, b) of var = a^2 sd^2 + b^2 sd_in^2 by the Gaussian likelihood: noise response plus a bias
    term that scales with the input noise."""
    from scipy.optimize import minimize

    e2, r2, i2 = (np.asarray(v, np.float64) ** 2 for v in (error, sd, sd_in))

    def nll(p):
        var = np.maximum(np.exp(2 * p[0]) * r2 + np.exp(2 * p[1]) * i2, 1e-20)
        return float(np.mean(np.log(var) + e2 / var))

    res = minimize(nll, [0.5, -1.5], method="Nelder-Mead")
    return float(np.exp(res.x[0])), float(np.exp(res.x[1]))


def cross_validated(fit: dict, name: str) -> dict[str, dict[str, float]]:
    """Two-fold cross-validation by series on the validation split (even / odd series index): each
    calibration (global factor, six attenuation bins, noise + input-proportional bias) fitted on one
    half and scored on the other; the mean of the two folds."""
    sd, error, series = fit[f"sd_{name}"], fit["error"], fit["series"]
    ref_in = fit.get("sd_input", fit.get("sd_hp"))
    att = sd / np.maximum(ref_in, 1e-12)
    scan = np.zeros_like(sd)
    for index in np.unique(series):  # the map's RMS over the scored voxels of its series
        scan[series == index] = np.sqrt(np.mean(sd[series == index].astype(np.float64) ** 2))
    features = {"noise_plus_bias": ref_in, "noise_plus_scan": scan}
    features.update({f"noise_plus_{f[5:]}": fit[f] for f in ("feat_detail", "feat_level") if f in fit})
    out: dict[str, list] = {"global": [], "att_bins": [], **{kind: [] for kind in features}}
    for fold in (0, 1):
        train, test = series % 2 == fold, series % 2 != fold
        c = fit_global(error[train], sd[train])
        edges, factors = fit_bins(error[train], sd[train], att[train])
        zero = np.zeros(int(test.sum()))
        out["global"].append(scores(error[test], c * sd[test], zero))
        out["att_bins"].append(scores(error[test], apply_bins(sd[test], att[test], edges, factors), zero))
        for kind, feature in features.items():
            a, b = fit_combo(error[train], sd[train], feature[train])
            combo = np.sqrt(a**2 * sd[test] ** 2 + b**2 * feature[test] ** 2)
            out[kind].append(scores(error[test], combo, zero))
    return {
        kind: {key: float(np.mean([f[key] for f in folds])) for key in ("coverage", "mean_z2", "nll")}
        for kind, folds in out.items()
    }


def per_series_noise_ratio(fit: dict, name: str) -> list[float]:
    """Per validation series: RMS of the error's noise part / RMS of the raw map (1 = exact)."""
    sd, noise, series = fit[f"sd_{name}"], fit["noise_part"], fit["series"]
    return [
        round(float(np.sqrt(np.mean(noise[series == s] ** 2) / np.mean(sd[series == s] ** 2))), 3)
        for s in np.unique(series)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", type=Path, required=True)
    parser.add_argument("--score", nargs="+", required=True, help="NAME=path.npz")
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    fit_data = load(args.fit)
    sets = {name: load(Path(path)) for name, _, path in (s.partition("=") for s in args.score)}
    result: dict = {}
    for k in (int(v) for v in args.ks.split(",")):
        fit = fields(fit_data, k)
        names = sorted(key[3:] for key in fit if key.startswith("sd_"))
        for name in names:
            sd_fit = fit[f"sd_{name}"]
            c = fit_global(fit["error"], sd_fit)
            ref_in = fit.get("sd_input", fit.get("sd_hp"))
            entry: dict = {"c": c}
            if "noise_part" in fit:
                entry["c_noise_only"] = fit_global(fit["noise_part"], sd_fit)
                entry["noise_ratio_per_series"] = per_series_noise_ratio(fit, name)
                entry["cv_val"] = cross_validated(fit, name)
            att_edges, att_factors = fit_bins(fit["error"], sd_fit, sd_fit / np.maximum(ref_in, 1e-12))
            entry["att_edges"], entry["att_factors"] = (
                [round(e, 4) for e in att_edges],
                [round(f, 3) for f in att_factors],
            )
            for set_name, data in sets.items():
                f = fields(data, k)
                if f"sd_{name}" not in f:
                    continue
                sd = f[f"sd_{name}"]
                att = sd / np.maximum(f.get("sd_input", f.get("sd_hp")), 1e-12)
                entry[set_name] = {
                    "global": scores(f["error"], c * sd, f["ref_var"]),
                    "att_bins": scores(f["error"], apply_bins(sd, att, att_edges, att_factors), f["ref_var"]),
                }
                if "noise_part" in f:
                    entry[set_name]["noise_only_global"] = scores(f["noise_part"], entry["c_noise_only"] * sd, 0 * sd)
            result[f"k{k}/{name}"] = entry
            line = f"k={k} {name:14} c={c:.3f}" + (
                f" c_noise={entry['c_noise_only']:.3f}" if "c_noise_only" in entry else ""
            )
            if "cv_val" in entry:
                line += " | cv " + " ".join(
                    f"{kind}: cov {v['coverage']:.3f} z2 {v['mean_z2']:.2f} nll {v['nll']:.3f}"
                    for kind, v in entry["cv_val"].items()
                )
            for set_name in sets:
                if set_name in entry:
                    g, a = entry[set_name]["global"], entry[set_name]["att_bins"]
                    line += (
                        f" | {set_name}: cov {g['coverage']:.3f} z2 {g['mean_z2']:.2f} nll {g['nll']:.3f}"
                        f" rel {g['reliability_max_log2']:.2f} ; bins cov {a['coverage']:.3f} z2 {a['mean_z2']:.2f}"
                        f" nll {a['nll']:.3f} rel {a['reliability_max_log2']:.2f}"
                    )
            print(line)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
