"""Benchmark library: load series, prepare k-pair inputs, run models and classical denoisers, score.

The command line is :mod:`asl_bench.cli` (``asl-benchmark``); study scripts import this module.

Masks: simulated scores are inside the brain (truth GM + WM + CSF probability > 0.5); the real scan
has no segmentation, so its scores are inside the head mask of the bundle's normalisation (guide above
20 % of its 99th percentile). Lesion CBF error: both the estimate and the noise-free deltaM are
quantified with the bundle's white-paper quantification (same M0 and sidecar); the error is the mean
absolute difference inside the lesion mask, in ml/100 g/min.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asl_enhance
import numpy as np
import torch
from asl_enhance import smoothing
from asl_enhance.bids import find_asl_series, load_nifti
from asl_enhance.layout import InputLayout
from asl_enhance.metrics import effective_pairs, nmse, nmse_corrected, per_pair_nmse, psnr_ssim
from asl_enhance.quantification import compute_cbf, quantify_series
from asl_enhance.transforms import LoadASLSeriesd, NormalizeASLd, RestoreScaled, SelectPairsd

from . import classical as cd

CLASSICAL = ("gaussian", "nlm", "bm3d", "guided")
#: central slices of each validation series on which slow (slice-wise) denoisers are tuned
TUNE_SLICES = 6
#: validation series used to tune the slow denoisers and to rank the classical ones
TUNE_SERIES = 5
#: NLM and BM3D run on this many test series / real-scan groups only, unless best classical
SLOW_SERIES, SLOW_GROUPS = 5, 4
MAX_REAL_GROUPS = 10
#: the bundle folder (its package asl_enhance lives inside it)
BUNDLE = Path(asl_enhance.__file__).resolve().parents[1]
INFERENCE_CONFIG = BUNDLE / "configs" / "inference.json"
SHIPPED_WEIGHTS = BUNDLE / "models" / "model.pt"
METHOD_ORDER = ("mean_k", *CLASSICAL, "gaussian_self", "gaussian_oracle")
METRICS = (
    "nmse_truth",
    "psnr",
    "ssim",
    "nmse_corrected",
    "effective_pairs",
    "lesion_cbf_mae",
    "level_ratio",
    "seconds",
)
#: columns of the fidelity rows (:mod:`asl_bench.fidelity`, written only when it runs); the planted
#: lesions' columns are named after fidelity.LESIONS
FIDELITY_COLUMNS = (
    "cr_hypo_r5",
    "cr_hypo_r2.5",
    "cr_hyper_r3.5",
    "cr_sim_hypo",
    "cr_sim_hyper",
    "structure_removed",
    "gm_wm_ratio_rel",
    "noharm_gm_change",
    "noharm_wm_change",
    "noharm_ok",
    "null_head_mean",
    "null_corr_anatomy",
    "null_corr_perfusion",
)
#: the benchmark's own data sets (the fidelity rows have others: fidelity_real, noharm_sim, ...)
BENCHMARK_SETS = ("test", "real")
SHORTCUTS = {
    "features": "network_def#features",
    "local_layers": "network_def#local_layers",
    "sigmas": "network_def#sigmas",
    "use_guide": "input_layout#use_guide",
    "use_noise_twin": "input_layout#use_noise_twin",
}


# -------------------------------------------------------------------------------------------- data
@dataclass
class Series:
    """One loaded series: the bundle's loaded data item plus masks and what scoring needs."""

    name: str
    item: dict[str, Any]
    voxel: tuple[float, ...]
    brain: np.ndarray  # scoring mask
    truth: np.ndarray | None = None
    lesion: np.ndarray | None = None
    cbf_params: Any = None
    m0: np.ndarray | None = None
    tissues: dict[str, np.ndarray] = field(default_factory=dict)  # simulated GM/WM/CSF probabilities
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return int(self.item["pairs"].shape[0])


def load_series(dataset_dir: Path, simulated: bool, limit: int | None) -> list[Series]:
    """Load every series of a data set with the bundle's LoadASLSeriesd (and truth maps if simulated)."""
    truth_dir = dataset_dir / "derivatives" / "simulation" if simulated else None
    items = find_asl_series(dataset_dir, truth_dir)
    if simulated:
        items = [i for i in items if "truth" in i]
    out = []
    for item in items[:limit]:
        d = LoadASLSeriesd()(item)
        voxel = tuple(float(v) for v in np.linalg.norm(d["affine"][:3, :3], axis=0))
        m0 = d["guide"] if d["guide_source"] == "m0" else None
        s = Series(f"{item['rel_dir']}/{item['stem']}", d, voxel, np.zeros(d["guide"].shape, bool), m0=m0)
        if simulated:
            base = Path(item["truth"]).parent / item["stem"]
            s.tissues = {t: load_nifti(f"{base}_label-{t}_probseg.nii.gz")[0] for t in ("GM", "WM", "CSF")}
            s.brain, s.truth = sum(s.tissues.values()) > 0.5, d["truth"]
            s.lesion = load_nifti(f"{base}_desc-lesion_mask.nii.gz")[0] > 0.5
            cbf = quantify_series(d, {"truth": s.truth}, m0)
            if cbf.maps:
                s.cbf_params, s.extra["truth_cbf_wp"] = cbf.params, cbf.maps["truth"]
        else:
            s.brain = prepare(s, list(range(s.num_pairs)))["mask"][0] > 0.5
        out.append(s)
    return out


def prepare(series: Series, group: Sequence[int]) -> dict[str, Any]:
    """The bundle's SelectPairsd + NormalizeASLd with ``group`` as input and the other pairs as reference."""
    pairs = series.item["pairs"]
    rest = [i for i in range(pairs.shape[0]) if i not in set(group)]
    d = dict(series.item, pairs=pairs[list(group) + rest])
    return normalise(SelectPairsd(num_input_pairs=len(group), mode="first", target="none")(d))


def normalise(d: dict[str, Any]) -> dict[str, Any]:
    """The bundle's NormalizeASLd with every input channel (guide and noise twin) built, for the
    head mask and the classical denoisers; :func:`run_model` re-normalises for each model."""
    return NormalizeASLd(keys=("input_mean",), layout=InputLayout(use_guide=True, use_noise_twin=True))(d)


def groups_for(num_pairs: int, k: int, max_groups: int) -> list[list[int]]:
    """Disjoint groups of k consecutive pairs, each leaving at least one pair as reference."""
    count = min(max_groups, num_pairs // k) if k < num_pairs else 0
    return [list(range(g * k, (g + 1) * k)) for g in range(count)]


# ------------------------------------------------------------------------------------------ models
@dataclass
class Model:
    name: str
    net: torch.nn.Module
    layout: InputLayout
    spec: str


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_top_level(text: str) -> list[str]:
    """Split ``key=value,key=value`` at commas outside brackets (values may be nested JSON lists)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Network weights from a model file or from a training checkpoint's ``model`` entry."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state


def build_model(spec: str, default_config: Path) -> Model:
    """NAME=weights.pt[:config.json...][:key=value,key=value]: the config's network_def with overrides.

    Several config files are merged in order, as ``monai.bundle run --config_file "[a, b]"`` does, so
    a training overlay (e.g. another backbone) applies to inference.json the same way."""
    from monai.bundle import ConfigParser

    name, _, rest = spec.partition("=")
    if not rest:
        raise SystemExit(f"--model {spec!r}: expected NAME=path/to/model.pt[:config.json...][:key=value,...]")
    weights, *options = rest.split(":")
    configs, overrides = [], {}
    for option in options:
        if option.endswith(".json"):
            configs.append(option)
        else:
            for pair in filter(None, split_top_level(option)):
                key, _, value = pair.partition("=")
                overrides[SHORTCUTS.get(key, key)] = parse_value(value)
    parser = ConfigParser()
    parser.read_config(configs or str(default_config))
    for key, value in overrides.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def", instantiate=True)
    net.load_state_dict(load_weights(weights))
    return Model(name, net.eval(), parser.get_parsed_content("input_layout"), spec)


def build_models(specs: Sequence[str] | None) -> list[Model]:
    """``--model`` specs on inference.json; none given: the shipped weights (clear exit if missing)."""
    if not specs and not SHIPPED_WEIGHTS.exists():
        raise SystemExit(f"{SHIPPED_WEIGHTS} does not exist: train the model first or pass --model NAME=weights.pt")
    return [build_model(spec, INFERENCE_CONFIG) for spec in specs or [f"network={SHIPPED_WEIGHTS}"]]


@torch.inference_mode()
def run_model(model: Model, prep: dict[str, Any]) -> np.ndarray:
    """Network output in the input's units: the bundle's NormalizeASLd with the model's own input
    settings, the network, then RestoreScaled."""
    d = NormalizeASLd(keys=("input_mean",), layout=model.layout)(prep)
    num_pairs = torch.tensor([int(prep["num_pairs_used"])])  # the bundle's PrepareBatchExtraInput passes it
    pred = model.net(torch.as_tensor(d["image"][None]), num_pairs)[0, 0].numpy()
    return RestoreScaled(keys="pred")({"pred": pred, "scale": d["scale"]})["pred"]


def time_model(model: Model, shape: tuple[int, int, int], repeats: int = 3) -> float:
    """Warm CPU seconds per volume on random input of ``shape`` (median of ``repeats``), as 4 pairs with a twin:
    the slowest path (the risk-chosen blend of 3 pairs and more included)."""
    x = torch.rand((1, model.layout.num_channels, *shape))
    if model.layout.twin_channel is not None:
        x[:, model.layout.twin_channel + 1] = 1.0
    num_pairs = torch.tensor([4])
    times = []
    with torch.inference_mode():
        model.net(x, num_pairs)
        for _ in range(repeats):
            start = time.perf_counter()
            model.net(x, num_pairs)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------- scoring
def score(series: Series, prep: dict[str, Any], estimate: np.ndarray) -> dict[str, float]:
    """Every metric of one estimate; NaN where it does not apply."""
    mask = series.brain
    out = dict.fromkeys(METRICS, math.nan)
    if "other_mean" in prep:
        ref, var = prep["other_mean"], prep["target_noise_var"]
        out["nmse_corrected"] = nmse_corrected(estimate, ref, var, mask)
        single = per_pair_nmse(prep["pair_noise_var"], ref, var, mask)
        out["effective_pairs"] = effective_pairs(out["nmse_corrected"], single)
        out["level_ratio"] = float(estimate[mask].mean() / ref[mask].mean())
    if series.truth is not None:
        truth = series.truth
        out["nmse_truth"] = nmse(estimate, truth, mask)
        out["psnr"], out["ssim"] = psnr_ssim(estimate, truth, mask)
        out["level_ratio"] = float(estimate[mask].mean() / truth[mask].mean())
        if series.cbf_params is not None and series.lesion is not None and series.lesion.any():
            cbf = compute_cbf(estimate, series.m0, series.cbf_params)
            out["lesion_cbf_mae"] = float(np.abs(cbf - series.extra["truth_cbf_wp"])[series.lesion].mean())
    return out


def classical_fn(name: str, params: dict[str, Any]) -> Callable[[dict[str, Any]], np.ndarray]:
    """Apply a tuned classical denoiser in normalised units and restore the series' units."""
    denoiser = cd.DENOISERS[name][0]
    return lambda prep: denoiser(prep["image"][0], prep["image"][1], params) * float(prep["scale"])


def self_tuned_fn(series: Series, group: Sequence[int]) -> Callable[[dict[str, Any]], np.ndarray]:
    """Gaussian at the width chosen from the scan's own input pairs (head mask; k >= 2)."""

    def run(prep: dict[str, Any]) -> np.ndarray:
        sigma_mm = smoothing.self_tuned_sigma_mm(series.item["pairs"][list(group)], series.voxel, prep["mask"][0] > 0)
        prep["self_sigma_mm"] = sigma_mm
        return smoothing.gaussian_smooth(prep["input_mean"], smoothing.sigma_in_voxels(sigma_mm, series.voxel))

    return run


def timed(fn: Callable[[dict[str, Any]], np.ndarray], prep: dict[str, Any]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn(prep)
    return np.asarray(out, np.float32), time.perf_counter() - start


# ----------------------------------------------------------------------------------------- tuning
def slab_of(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The central TUNE_SLICES slices of the brain (slice-wise denoisers give the same result on them)."""
    z = np.flatnonzero(brain.any(axis=(0, 1)))
    lo = max(0, (int(z[len(z) // 2]) if z.size else brain.shape[2] // 2) - TUNE_SLICES // 2)
    return np.ascontiguousarray(volume[..., lo : lo + TUNE_SLICES])


def tuning_cases(series: list[Series], k: int) -> list[tuple[np.ndarray, ...]]:
    """(input, guide, truth, mask) in normalised units, one per validation series with >= k pairs."""
    cases = []
    for s in series:
        if s.num_pairs >= k:
            prep = prepare(s, list(range(k)))
            cases.append((prep["image"][0], prep["image"][1], s.truth / prep["scale"], s.brain))
    return cases


def rank_error(name: str, params: dict[str, Any], cases: list[tuple[np.ndarray, ...]]) -> float:
    """Geometric-mean NMSE on the central slabs; the 3D Gaussian runs on the whole volume, then is cut."""
    fn, errors = cd.DENOISERS[name][0], []
    for x, g, t, m in cases:
        if name == "gaussian":
            out = slab_of(fn(x, g, params), m)
        else:
            x, g = slab_of(x, m), slab_of(g, m)
            out = fn(x, g, params)
        errors.append(nmse(out, slab_of(t, m), slab_of(m, m)))
    return cd.geometric_mean(errors)


def tune_all(val: list[Series], ks: Sequence[int], grids: dict[str, list[dict]], log) -> dict[int, dict]:
    """Per k: tuned parameters of each classical denoiser and the best one on the validation split.

    The Gaussian (3D) is tuned on whole volumes of every series, the slice-wise guided filter on the
    central slabs of every series, NLM and BM3D (slow) on the slabs of the first TUNE_SERIES; the
    four are ranked on those TUNE_SERIES slabs (the Gaussian applied to the whole volume, then cut)."""
    tuned: dict[int, dict] = {}
    for k in ks:
        start = time.perf_counter()
        full = tuning_cases(val, k)
        slab = [tuple(slab_of(a, m) for a in (x, g, t, m)) for x, g, t, m in full]
        params = {"gaussian": cd.tune_gaussian(full, *grids["gaussian"])[0]}
        params["guided"] = cd.tune(cd.guided, grids["guided"], slab)[0]
        ranking = {name: rank_error(name, params[name], full[:TUNE_SERIES]) for name in ("gaussian", "guided")}
        for name in ("nlm", "bm3d"):  # tuned on exactly the ranking slabs: reuse the score
            params[name], scores = cd.tune(cd.DENOISERS[name][0], grids[name], slab[:TUNE_SERIES])
            ranking[name] = min(scores)
        best = min(ranking, key=ranking.get)
        tuned[k] = {"params": params, "val_slab_nmse": ranking, "best": best}
        log(f"tuned k={k} in {time.perf_counter() - start:.0f}s: best {best}; {json.dumps(params)}")
    return tuned


def oracle_sigma(cases: list[tuple[Series, dict]], grid: list[dict], corrected: bool) -> dict[str, float]:
    """Gaussian width best for a whole test set (upper bound): geometric-mean truth NMSE, or median
    corrected error (real; it can be negative)."""
    scores = []
    for params in grid:
        errs = []
        for s, prep in cases:
            est = cd.gaussian(prep["input_mean"], None, params)  # type: ignore[arg-type]
            if corrected:
                errs.append(nmse_corrected(est, prep["other_mean"], prep["target_noise_var"], s.brain))
            else:
                errs.append(nmse(est, s.truth, s.brain))
        scores.append(float(np.median(errs)) if corrected else cd.geometric_mean(errs))
    return dict(grid[int(np.argmin(scores))])


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class Run:
    rows: list[dict[str, Any]] = field(default_factory=list)
    figure: dict[str, dict[str, Any]] = field(default_factory=dict)
    oracle: dict[str, dict[int, dict]] = field(default_factory=dict)


def evaluate_set(
    label: str,
    series: list[Series],
    ks: Sequence[int],
    tuned: dict[int, dict],
    models: list[Model],
    gauss_grid: list[dict],
    real: bool,
    run: Run,
    log,
) -> None:
    """Score every method on every series (simulated) or pair group (real) of one data set."""
    max_groups = MAX_REAL_GROUPS if real else 1
    for k in ks:
        start = time.perf_counter()
        cases = [(s, g, prepare(s, g)) for s in series for g in groups_for(s.num_pairs, k, max_groups)]
        if not cases:
            continue
        oracle = oracle_sigma([(s, p) for s, _, p in cases], gauss_grid, corrected=real)
        run.oracle.setdefault(label, {})[k] = oracle
        best = tuned[k]["best"]
        for index, (s, group, prep) in enumerate(cases):
            methods: dict[str, tuple[Callable, dict]] = {"mean_k": (lambda p: p["input_mean"], {})}
            slow_ok = (index < SLOW_GROUPS) if real else (series.index(s) < SLOW_SERIES)
            for name in CLASSICAL:
                if name == best or not cd.DENOISERS[name][2] or slow_ok:
                    methods[name] = (classical_fn(name, tuned[k]["params"][name]), tuned[k]["params"][name])
            if k >= 2:
                methods["gaussian_self"] = (self_tuned_fn(s, group), {})
            methods["gaussian_oracle"] = (classical_fn("gaussian", oracle), oracle)
            for model in models:
                methods[model.name] = (lambda p, m=model: run_model(m, p), {"spec": model.spec})
            keep = k == 2 and (s is series[0]) and group == groups_for(s.num_pairs, k, max_groups)[0]
            for method, (fn, params) in methods.items():
                estimate, seconds = timed(fn, prep)
                if "self_sigma_mm" in prep and method == "gaussian_self":
                    params = {"sigma_mm": prep.pop("self_sigma_mm")}
                add_row(run, label, s, k, group, method, params, score(s, prep, estimate), seconds, best)
                if keep:
                    run.figure.setdefault(label, {"series": s, "prep": prep})[method] = estimate
        log(f"{label} k={k}: {len(cases)} inputs in {time.perf_counter() - start:.0f}s")


def evaluate_full_scan(label: str, series: list[Series], tuned: dict[int, dict], run: Run, log) -> None:
    """Today's full scan: mean of all pairs, and after the best classical denoiser tuned for that many."""
    for s in series:
        n = s.num_pairs
        if n not in tuned:
            continue
        prep = prepare(s, list(range(n)))
        best = tuned[n]["best"]
        methods = {
            "mean_all": (lambda p: p["input_mean"], {}),
            f"mean_all+{best}": (classical_fn(best, tuned[n]["params"][best]), tuned[n]["params"][best]),
        }
        for method, (fn, params) in methods.items():
            estimate, seconds = timed(fn, prep)
            add_row(run, label, s, n, list(range(n)), method, params, score(s, prep, estimate), seconds, best)
            if s is series[0] and method == "mean_all":
                run.figure.setdefault(label, {"series": s, "prep": prep})[method] = estimate
    log(f"{label}: full-scan rows done")


def add_row(run: Run, label, s: Series, k: int, group, method: str, params, scores, seconds, best) -> None:
    row = {
        "dataset": label,
        "series": s.name,
        "k": k,
        "group": "-".join(map(str, group)),
        "method": method,
        "best_classical": best,
        "params": json.dumps(params, sort_keys=True),
    }
    row.update({m: scores[m] for m in METRICS if m != "seconds"})
    row["seconds"] = seconds
    run.rows.append(row)


# ---------------------------------------------------------------------------------------- summary
def primary(dataset: str) -> str:
    return "nmse_corrected" if dataset == "real" or dataset.endswith("_real") else "nmse_truth"


def primary_error(series: Series, prep: dict[str, Any], estimate: np.ndarray) -> float:
    """The headline error alone (no SSIM or CBF): NMSE against the truth where the series has one,
    else the noise-corrected NMSE against the pairs not used."""
    if series.truth is not None:
        return nmse(estimate, series.truth, series.brain)
    return nmse_corrected(estimate, prep["other_mean"], prep["target_noise_var"], series.brain)


def summarise(rows: list[dict[str, Any]], tuned: dict[int, dict]) -> list[dict[str, Any]]:
    """Median per data set x k x method, with paired median ratios to the k-pair mean and best classical."""
    index = {(r["dataset"], r["series"], r["k"], r["group"], r["method"]): r for r in rows}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["k"], r["method"])].append(r)
    out = []
    for (dataset, k, method), members in groups.items():
        metric = primary(dataset)
        summary = {"dataset": dataset, "k": k, "method": method, "n": len(members)}
        for m in METRICS:
            summary[m] = _nanmedian([r[m] for r in members])
        best = tuned.get(k, {}).get("best", "")
        for col, ref in (("ratio_to_mean_k", "mean_k"), ("ratio_to_best_classical", best)):
            ratios = [
                r[metric] / index[key][metric]
                for r in members
                if (key := (dataset, r["series"], k, r["group"], ref)) in index and index[key][metric] > 0
            ]
            summary[col] = _nanmedian(ratios)
        for m in FIDELITY_COLUMNS:  # only where fidelity rows carry them, so other rows keep their columns
            if any(m in r for r in members):
                summary[m] = _nanmedian([r.get(m, math.nan) for r in members])
        out.append(summary)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(out, key=lambda r: (r["dataset"], r["k"], order.get(r["method"], 50), r["method"]))


def _nanmedian(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], np.float64)
    return float(np.nanmedian(arr)) if arr.size and np.isfinite(arr).any() else math.nan


def markdown(summary: list[dict[str, Any]], k_show: int | None = None) -> str:
    cols = ["dataset", "k", "method", "n", *METRICS, "ratio_to_mean_k", "ratio_to_best_classical"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        if r["dataset"] not in BENCHMARK_SETS:
            continue
        if k_show is not None and r["k"] != k_show and not r["method"].startswith("mean_all"):
            continue
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def pivot(summary: list[dict[str, Any]]) -> str:
    """Compact table: primary error per method (rows) and data set x k (columns)."""
    summary = [r for r in summary if r["dataset"] in BENCHMARK_SETS]
    keys = sorted(
        {(r["dataset"], r["k"]) for r in summary if not r["method"].startswith("mean_all")},
        key=lambda t: (t[0] != "test", t[1]),
    )
    methods = list(dict.fromkeys(r["method"] for r in summary))
    methods.sort(key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 50, m.startswith("mean_all")))
    cell = {(r["dataset"], r["k"], r["method"]): r[primary(r["dataset"])] for r in summary}
    head = [f"{'sim NMSE vs truth' if d == 'test' else 'real corrected NMSE'} k={k}" for d, k in keys]
    lines = ["| method | " + " | ".join(head) + " |", "|" + "---|" * (len(keys) + 1)]
    for m in methods:
        if m.startswith("mean_all"):
            values = [cell.get(("test", r["k"], m), math.nan) for r in summary if r["method"] == m][:1]
            lines.append(f"| {m} (k = all) | " + " | ".join(_fmt(v) for v in values) + " |")
            continue
        lines.append(f"| {m} | " + " | ".join(_fmt(cell.get((d, k, m), math.nan)) for d, k in keys) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def paired_median(rows, dataset, k, method, ref_method, ref_k=None, metric=None) -> float:
    """Median over inputs of metric(method) / metric(reference) on the same series (and pair group)."""
    metric = metric or primary(dataset)
    ref = {
        (r["series"], r["group"] if ref_k is None else ""): r[metric]
        for r in rows
        if r["dataset"] == dataset and r["method"] == ref_method and r["k"] == (ref_k or k)
    }
    ratios = [
        r[metric] / ref[key]
        for r in rows
        if r["dataset"] == dataset
        and r["k"] == k
        and r["method"] == method
        and (key := (r["series"], r["group"] if ref_k is None else "")) in ref
        and ref[key] > 0
    ]
    return _nanmedian(ratios)


def targets(rows, summary, tuned, models: list[Model], timings: dict[str, dict[str, float]]) -> list[str]:
    """One line per target of issue 8 (k = 2), per model."""
    k, lines = 2, []
    med = {(r["dataset"], r["k"], r["method"]): r for r in summary}
    for model in models:
        name = model.name
        if ("test", k, name) in med:
            best = tuned[k]["best"]
            r1 = paired_median(rows, "test", k, name, "mean_k")
            r2 = paired_median(rows, "test", k, name, best)
            les_net, les_best = med[("test", k, name)]["lesion_cbf_mae"], med[("test", k, best)]["lesion_cbf_mae"]
            full = [m for (d, _, m) in med if d == "test" and m.startswith("mean_all+")]
            n_all = next((kk for (d, kk, m) in med if d == "test" and m.startswith("mean_all+")), None)
            r3 = paired_median(rows, "test", k, name, full[0], ref_k=n_all) if full else math.nan
            lines += [
                _verdict(f"{name}: sim NMSE vs truth <= 0.4x 2-pair mean", r1 <= 0.4, f"ratio {r1:.3f}"),
                _verdict(f"{name}: sim NMSE <= 0.6x best classical ({best})", r2 <= 0.6, f"ratio {r2:.3f}"),
                _verdict(
                    f"{name}: lesion CBF error < best classical",
                    les_net < les_best,
                    f"{les_net:.2f} vs {les_best:.2f} ml/100g/min",
                ),
                _verdict(
                    f"{name}: sim NMSE <= {full[0] if full else '?'} (all {n_all} pairs)", r3 <= 1.0, f"ratio {r3:.3f}"
                ),
            ]
        if ("real", k, name) in med:
            net = med[("real", k, name)]["nmse_corrected"]
            oracle = med[("real", k, "gaussian_oracle")]["nmse_corrected"]
            r5 = paired_median(rows, "real", k, name, "gaussian_self")
            lines += [
                _verdict(f"{name}: real corrected error < oracle Gaussian", net < oracle, f"{net:.4f} vs {oracle:.4f}"),
                _verdict(f"{name}: real corrected error <= 0.8x self-tuned Gaussian", r5 <= 0.8, f"ratio {r5:.3f}"),
            ]
        t = timings.get(name, {})
        for shape, limit in (("64x64x20", 1.0), ("96x96x48", 3.0)):
            if shape in t:
                lines.append(_verdict(f"{name}: {shape} on CPU < {limit:g} s", t[shape] < limit, f"{t[shape]:.2f} s"))
    return lines


def _verdict(text: str, ok: bool, numbers: str) -> str:
    return f"{'MET    ' if ok else 'NOT MET'} {text}: {numbers}"


# ------------------------------------------------------------------------------------------ figure
def figure(run: Run, path: Path, models: list[Model], tuned: dict[int, dict]) -> None:
    """k = 2: one slice of the first test subject and of the real scan, one colour scale per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = tuned.get(2, {}).get("best", "gaussian")
    columns = ["reference", "mean_k", "gaussian", best, *[m.name for m in models], "mean_all"]
    columns = list(dict.fromkeys(columns))
    rows = [label for label in ("test", "real") if label in run.figure]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.5 * len(rows)), squeeze=False)
    for r, label in enumerate(rows):
        maps = dict(run.figure[label])
        s: Series = maps.pop("series")
        maps.pop("prep")
        ref = s.truth if s.truth is not None else s.item["pairs"].mean(axis=0)
        maps["reference"] = ref
        z = int(np.argmax(s.brain.sum(axis=(0, 1))))
        lo, hi = np.percentile(ref[s.brain], [1, 99.5])
        names = {
            "reference": "truth" if s.truth is not None else f"mean of {s.num_pairs} pairs",
            "mean_k": "2-pair mean",
            "gaussian": "Gaussian (tuned)",
            best: f"{best} (best classical)",
            "mean_all": f"mean of {s.num_pairs} pairs",
        }
        for c, col in enumerate(columns):
            ax = axes[r, c]
            ax.axis("off")
            if col in maps:
                ax.imshow(np.rot90(maps[col][..., z]), cmap="gray", vmin=lo, vmax=hi)
                ax.set_title(names.get(col, col), fontsize=8)
        axes[r, 0].text(
            -0.05,
            0.5,
            f"{label}: {Path(s.name).name}",
            transform=axes[r, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
        )
    fig.suptitle(
        "k = 2 input pairs; one colour scale per row (reference's 1-99.5th percentile in the brain/head)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
