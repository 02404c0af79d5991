"""Fidelity measurements (issue 17): does a method keep lesions, tissue contrast and clean detail?

A lower error alone does not tell a denoiser from a blur. For every method (the k-pair mean, the
Gaussian at several widths, the validation-tuned and the self-tuned Gaussian, the classical denoisers,
each model) at k = 1, 2, 4 this module measures:

- **Lesion contrast recovery (real scans)**: lesions planted into every pair of a real long scan.
  Each pair keeps its own noise exactly: with gain g(x) (1 outside the lesion, ``factor`` inside,
  a linear ramp one voxel wide at the radius), pair_i' = pair_i + (g - 1) * mean, so
  pair_i' - mean' = pair_i - mean and the all-pair mean (the truth) becomes g * mean. Lesions:
  hypoperfusion to 20 % at radius 5 and 2.5, hyperperfusion to 180 % at radius 3.5 (radii in
  in-plane voxels; the sphere is round in mm, so it spans fewer of a 2D scan's thick slices).
  CR = (shell - core of the output) / (shell - core of the truth), summed over the lesions of one
  input before the ratio (a ratio of mean contrasts, steadier than a mean of ratios); 1 is perfect,
  0 a map with no lesion. Core: inside 0.5 x radius; shell: from radius + 0.5 (where the ramp ends)
  to radius + 0.5 + max(2, radius / 2); both inside the head. Placement: every lesion with its
  shell at least one voxel inside the head mask, lesions (with shells) apart by two voxels, hypo-
  where perfusion is high (the lesion-sized local mean of the all-pair mean in the head's 60-98th
  percentile), hyper- in tissue (30-90th); each input gets its own random positions (seeded).
- **Lesion contrast recovery (simulated)**: the simulator's own lesion (a part of a vascular
  territory, ``desc-lesion_mask`` > 0.5) against the noise-free truth; core = lesion voxels at
  least half the lesion's largest inner depth from its edge, shell = brain voxels 1 to
  1 + max(2, half that depth) voxels outside it.
- **Structure removed**: <input mean - output, reference> / <reference, reference> in the head,
  with the leave-out reference (mean of the unused pairs; its energy less its own noise, as the
  corrected NMSE does) on real scans and the truth on simulated ones. 0: nothing of the perfusion
  pattern removed; 1: all of it.
- **Tissue contrast**: the output's GM/WM median ratio over the reference's. Simulated: probseg
  GM > 0.7, WM > 0.9 (the bundle's quantification thresholds). Real scans have no segmentation:
  GM-like = head voxels in the 70-95th percentile of the all-pair mean deltaM, WM-like = 35-55th
  (the head mask holds scalp and CSF with deltaM near zero, hence the bands). Selecting on the
  all-pair mean biases the input mean and the reference alike (their noise covaries equally with it),
  so the k-pair mean reads 1 in expectation.
- **No harm**: with every pair of a series as input (k = all), and on a clean simulated scan (the
  truth as input), the output's GM(-like) and WM(-like) medians against the input's; passes within
  5 %. **No structure from nothing**: on a perfusion-free series (every pair minus the all-pair
  mean on real scans, minus the truth on simulated ones; the guide is kept), the output's head mean
  over the real series' head mean deltaM and its correlation with the anatomy (the guide) and with
  the perfusion map.
- The error: noise-corrected NMSE against the unused pairs (real), NMSE against the truth (simulated).

:func:`evaluate` runs it all and appends rows (data sets ``fidelity_real``, ``fidelity_sim``,
``noharm_real``, ``noharm_sim``, ``clean_sim``) to the benchmark's :class:`~asl_bench.core.Run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from asl_enhance import smoothing
from asl_enhance.fidelity import (  # noqa: F401  (the measures live in the bundle; re-exported here)
    CORE_FRACTION,
    EDGE,
    GAP,
    GM_BAND,
    HYPER_BAND,
    HYPO_BAND,
    LESIONS,
    WM_BAND,
    LesionSpec,
    contrast,
    contrast_recovery,
    lesion_regions,
    outer_radius,
    place_lesions,
    plant_lesions,
    quantile_masks,
    scaled_distance,
    shell_width,
    solid_head,
    sphere_weight,
    structure_removed,
    tissue_ratio,
    tissue_ratio_rel,
    voxel_units,
)
from asl_enhance.metrics import nmse, nmse_corrected
from asl_enhance.quantification import GM_THRESHOLD, WM_THRESHOLD
from asl_enhance.transforms import keep_longest_pld_block
from scipy import ndimage

from . import classical as cd
from . import core
from .core import FIDELITY_COLUMNS, METRICS, Model, Run, Series

# ---------------------------------------------------------------------- settings and measures
#: in-plane Gaussian sigmas (voxels; round in mm) of the Gaussian curve
GAUSS_WIDTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
#: no-harm tolerance on tissue medians
NOHARM_TOL = 0.05
#: defaults: pair groups per real series and k, lesions of each type per input, simulated subjects
#: for the no-harm and perfusion-free checks, fewest pairs a real series needs
GROUPS, PER_TYPE, CHECK_SERIES, MIN_PAIRS = 2, 3, 4, 6


def simulated_masks(series: Series) -> tuple[np.ndarray, np.ndarray]:
    """GM and WM of a simulated subject at the bundle's quantification thresholds."""
    return series.tissues["GM"] > GM_THRESHOLD, series.tissues["WM"] > WM_THRESHOLD


def no_harm(
    input_mean: np.ndarray, output: np.ndarray, gm: np.ndarray, wm: np.ndarray, tol: float = NOHARM_TOL
) -> dict[str, float]:
    """Relative change of the GM and WM medians from input to output; ok (1.0) if both within tol."""
    out = {}
    for name, mask in (("gm", gm), ("wm", wm)):
        before = float(np.median(input_mean[mask])) if mask.any() else math.nan
        out[f"noharm_{name}_change"] = float(np.median(output[mask]) / before - 1.0) if before else math.nan
    changes = [out["noharm_gm_change"], out["noharm_wm_change"]]
    out["noharm_ok"] = float(all(np.isfinite(c) and abs(c) <= tol for c in changes))
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def null_checks(output: np.ndarray, guide: np.ndarray, perfusion: np.ndarray, head: np.ndarray) -> dict[str, float]:
    """On a perfusion-free input: the output's head mean over the real perfusion's head mean, and its
    correlation (in the head) with the anatomy (the guide) and with the perfusion map."""
    level = float(np.mean(perfusion[head], dtype=np.float64))
    return {
        "null_head_mean": float(np.mean(output[head], dtype=np.float64) / level) if level else math.nan,
        "null_corr_anatomy": _corr(output[head], guide[head]),
        "null_corr_perfusion": _corr(output[head], perfusion[head]),
    }


def sim_lesion_regions(
    lesion: np.ndarray, brain: np.ndarray, voxel: Sequence[float]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(core, shell) of a simulated lesion mask; None if there is none."""
    lesion = np.asarray(lesion, bool)
    if not lesion.any():
        return None
    units = voxel_units(voxel)
    inner = ndimage.distance_transform_edt(np.pad(lesion, 1), sampling=units)[1:-1, 1:-1, 1:-1]
    outer = ndimage.distance_transform_edt(~lesion, sampling=units)
    depth = float(inner.max())
    core_mask = lesion & (inner >= CORE_FRACTION * depth) & brain
    shell = ~lesion & (outer > 1.0) & (outer <= 1.0 + max(2.0, CORE_FRACTION * depth)) & brain
    return core_mask, shell


def sim_lesion_kind(series: Series) -> str:
    """The simulator's lesion kind (hypo, hyper, none) from the truth sidecar; else from the truth."""
    item = series.item
    path = Path(item["dataset_dir"]) / "derivatives" / "simulation" / item["rel_dir"]
    sidecar = path / f"{item['stem']}_desc-truth_deltam.json"
    if sidecar.exists():
        kind = json.loads(sidecar.read_text()).get("perfusion", {}).get("lesion", {}).get("kind")
        if kind:
            return str(kind)
    if series.lesion is None or not series.lesion.any():
        return "none"
    regions = sim_lesion_regions(series.lesion, series.brain, series.voxel)
    return "hypo" if regions and contrast(series.truth, *regions) > 0 else "hyper"


# ------------------------------------------------------------------------------------- real series
def longest_pld_block(series: Series) -> tuple[Series, str]:
    """A multi-PLD series reduced to the pairs at its longest PLD (a one-PLD long scan); others as is
    (the bundle's :func:`~asl_enhance.transforms.keep_longest_pld_block`, which evaluate.json uses)."""
    item = dict(series.item)
    keep_longest_pld_block(item)
    if item["pair_volumes"] == series.item["pair_volumes"]:
        return series, ""
    reduced = dataclasses.replace(series, item=item)
    reduced.brain = core.prepare(reduced, list(range(reduced.num_pairs)))["mask"][0] > 0.5
    return reduced, json.loads(item["input_notes"])[-1]


def load_real(dirs: Sequence[Path], min_pairs: int = MIN_PAIRS) -> tuple[list[Series], dict[str, str]]:
    """Every series of the real BIDS-ASL data sets (multi-PLD: longest-PLD block), named
    ``<data set folder>/<series>``; those with fewer than ``min_pairs`` pairs are left out."""
    out, notes = [], {}
    for directory in dirs:
        for s in core.load_series(Path(directory), False, None):
            s, note = longest_pld_block(dataclasses.replace(s, name=f"{Path(directory).name}/{s.name}"))
            if s.num_pairs < min_pairs:
                notes[s.name] = f"left out: {s.num_pairs} pairs (< {min_pairs})"
                continue
            if note:
                notes[s.name] = note
            out.append(s)
    return out, notes


def named(series: Sequence[Series], prefix: str) -> list[Series]:
    return [dataclasses.replace(s, name=f"{prefix}/{s.name}") for s in series]


#: where the studies find their real long scans: the fetched validation scan and the converted public runs
REAL_SCAN, SHARED_REAL = Path(".cache/real/ds000240"), Path("../shared/real-asl")


def study_series() -> list[Series]:
    """The 8 real long scans every fidelity study scores, in one order: ds000240 (its first series), then the
    runs of ``scripts/convert_real_asl.py`` (multi-PLD: longest-PLD block)."""
    return named(core.load_series(REAL_SCAN, False, 1), "ds000240") + load_real([SHARED_REAL])[0]


# ---------------------------------------------------------------------------------------- methods
Method = tuple[Callable[[dict[str, Any]], np.ndarray], dict[str, Any], str]


def gaussian_curve_fn(width: float, voxel: Sequence[float]) -> Callable[[dict[str, Any]], np.ndarray]:
    """Gaussian of in-plane sigma ``width`` voxels, round in mm."""
    sigma = tuple(width / u for u in voxel_units(voxel))
    return lambda prep: smoothing.gaussian_smooth(prep["input_mean"], sigma)


def tuned_for(tuned: dict[int, dict], k: int) -> tuple[int, dict]:
    """The tuned parameters for k, else for the largest tuned k below it (k = all pairs)."""
    key = k if k in tuned else max([t for t in tuned if t <= k], default=min(tuned))
    return key, tuned[key]


def fingerprint(model: Model) -> str:
    """Same weights, same settings, same layout: the same output (so it is computed once)."""
    h = hashlib.sha1(repr(model.net).encode())
    tensors = dict(model.net.state_dict())
    tensors.update(dict(model.net.named_buffers()))  # non-persistent ones too (fixed blur kernels)
    for key, value in sorted(tensors.items()):
        h.update(key.encode())
        h.update(value.detach().cpu().numpy().tobytes())
    for module in model.net.modules():
        for key, value in sorted(vars(module).items()):
            if not key.startswith("_") and isinstance(value, (int, float, bool, str, tuple, list)):
                h.update(f"{key}={value!r}".encode())
    h.update(repr(model.layout).encode())
    return h.hexdigest()


def methods_for(
    series: Series, group: Sequence[int], k: int, tuned: dict[int, dict], models: Sequence[Model], slow_ok: bool
) -> dict[str, Method]:
    """name -> (function of a prepared input, parameters, cache key) for every method at k."""
    _, tk = tuned_for(tuned, k)
    methods: dict[str, Method] = {"mean_k": (lambda p: p["input_mean"], {}, "mean_k")}
    unit = float(min(series.voxel[:2]))
    for w in GAUSS_WIDTHS:
        methods[f"gauss_{w:g}"] = (gaussian_curve_fn(w, series.voxel), {"sigma_mm": round(w * unit, 3)}, f"g{w}")
    for name in core.CLASSICAL:
        if name == tk["best"] or not cd.DENOISERS[name][2] or slow_ok:
            params = tk["params"][name]
            methods[name] = (core.classical_fn(name, params), params, name)
    if len(group) >= 2:
        methods["gaussian_self"] = (core.self_tuned_fn(series, group), {}, "gaussian_self")
    for model in models:
        key = f"model:{getattr(model, 'fidelity_key', model.name)}"
        methods[model.name] = (lambda p, m=model: core.run_model(m, p), {"spec": model.spec}, key)
    return methods


def run_methods(methods: dict[str, Method], prep: dict[str, Any]) -> dict[str, tuple[np.ndarray, float, dict]]:
    """Every method's output, seconds and parameters on one prepared input; equal keys run once."""
    done: dict[str, tuple[np.ndarray, float, dict]] = {}
    by_key: dict[str, tuple[np.ndarray, float]] = {}
    for name, (fn, params, key) in methods.items():
        if key not in by_key:
            by_key[key] = core.timed(fn, prep)
            if "self_sigma_mm" in prep:
                params = {"sigma_mm": prep.pop("self_sigma_mm")}
        done[name] = (*by_key[key], dict(params))
    return done


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class Options:
    ks: Sequence[int] = (1, 2, 4)
    groups: int = GROUPS
    per_type: int = PER_TYPE
    sim_series: int | None = None
    check_series: int = CHECK_SERIES
    slow: bool = True
    seed: int = 0


@dataclass
class PlantedGroup:
    """One k-pair input group of a real long scan, with lesions planted into every pair (each keeps its noise)."""

    k: int
    index: int
    group: list[int]
    lesions: list
    planted: Series
    truth: np.ndarray  # the all-pair mean with the same lesions
    regions: dict[str, list]  # per lesion kind, the core and shell of each placed lesion


def planted_groups(s: Series, position: int, ks: Sequence[int], opts: Options) -> Iterator[PlantedGroup]:
    """Every k's disjoint input groups of ``s`` (the ``position``-th series of a run), each with lesions of its
    own seed, so the benchmark and the studies that call it plant the same lesions in the same places."""
    pairs = s.item["pairs"]
    allmean = pairs.mean(axis=0)
    tissue = solid_head(s.brain)
    for k in ks:
        for gi, group in enumerate(core.groups_for(s.num_pairs, k, opts.groups)):
            rng = np.random.default_rng([opts.seed, position, k, gi])
            lesions = place_lesions(allmean, tissue, s.voxel, LESIONS, opts.per_type, rng)
            planted = dataclasses.replace(s, item=dict(s.item, pairs=plant_lesions(pairs, lesions, s.voxel)))
            regions = {
                spec.name: [lesion_regions(s.brain.shape, c, spec, s.voxel, tissue) for sp, c in lesions if sp == spec]
                for spec in LESIONS
            }
            yield PlantedGroup(k, gi, group, lesions, planted, planted.item["pairs"].mean(axis=0), regions)


def add_gaussian_curve(plain: dict, lesioned: dict, prep: dict, prep_l: dict, voxel: Sequence[float]) -> None:
    """A study's outputs on an input and on its planted twin, with the benchmark's Gaussian curve
    (:data:`GAUSS_WIDTHS`) and the k-pair mean added beside them."""
    for w in GAUSS_WIDTHS:
        blur = gaussian_curve_fn(w, voxel)
        plain[f"gauss_{w:g}"], lesioned[f"gauss_{w:g}"] = blur(prep), blur(prep_l)
    plain["mean_k"], lesioned["mean_k"] = prep["input_mean"], prep_l["input_mean"]


def planted_scores(
    out: np.ndarray, lesioned: np.ndarray, prep: dict, g: PlantedGroup, gm: np.ndarray, wm: np.ndarray, brain
) -> dict[str, float]:
    """A study row's scores of one output: noise-corrected error, structure removed and GM/WM ratio against
    the leave-out reference, and each lesion kind's contrast recovery on the planted input's output."""
    ref, var = prep["other_mean"], prep["target_noise_var"]
    row = {
        "nmse": nmse_corrected(out, ref, var, brain),
        "removed": structure_removed(prep["input_mean"], out, ref, brain, var),
        "gm_wm": tissue_ratio_rel(out, ref, gm, wm),
    }
    for spec in LESIONS:
        row[f"cr_{spec.name}"] = contrast_recovery(lesioned, g.truth, g.regions[spec.name])
    return row


def _row(run: Run, label: str, s: Series, k: int, group, method: str, params, seconds, best, values) -> None:
    scores = dict.fromkeys(METRICS, math.nan)
    scores.update({m: v for m, v in values.items() if m in METRICS})
    core.add_row(run, label, s, k, group, method, params, scores, seconds, best)
    run.rows[-1].update({c: float(values[c]) for c in FIDELITY_COLUMNS if c in values})


def evaluate_real(
    series: Sequence[Series], tuned: dict, models: Sequence[Model], opts: Options, run: Run, log
) -> dict[str, Any]:
    """Planted-lesion CR, structure removed, tissue contrast, error and the perfusion-free check on
    real long scans (``fidelity_real``), and no harm at k = all (``noharm_real``)."""
    placed: dict[str, list] = {}
    for si, s in enumerate(series):
        start = time.perf_counter()
        pairs = s.item["pairs"]
        allmean = pairs.mean(axis=0)
        gm, wm = quantile_masks(allmean, s.brain)
        null = dataclasses.replace(s, item=dict(s.item, pairs=(pairs - allmean[None]).astype(np.float32)))
        for g in planted_groups(s, si, opts.ks, opts):
            k, gi, group, planted, truth, regions = g.k, g.index, g.group, g.planted, g.truth, g.regions
            tk_key, tk = tuned_for(tuned, k)
            placed.setdefault(s.name, []).append(
                {"k": k, "group": gi, "lesions": [[spec.name, list(c)] for spec, c in g.lesions]}
            )
            slow_ok = opts.slow and gi == 0
            prep = core.prepare(s, group)
            plain = run_methods(methods_for(s, group, k, tuned, models, slow_ok), prep)
            prep_l = core.prepare(planted, group)
            lesioned = run_methods(methods_for(planted, group, k, tuned, models, slow_ok), prep_l)
            nulled = {}
            if gi == 0:
                prep_n = core.prepare(null, group)
                nulled = run_methods(methods_for(null, group, k, tuned, models, slow_ok), prep_n)
            for method, (out, seconds, params) in plain.items():
                ref, var = prep["other_mean"], prep["target_noise_var"]
                values = {
                    "nmse_corrected": nmse_corrected(out, ref, var, s.brain),
                    "level_ratio": float(out[s.brain].mean() / ref[s.brain].mean()),
                    "structure_removed": structure_removed(prep["input_mean"], out, ref, s.brain, var),
                    "gm_wm_ratio_rel": tissue_ratio_rel(out, ref, gm, wm),
                }
                for spec in LESIONS:
                    values[f"cr_{spec.name}"] = contrast_recovery(lesioned[method][0], truth, regions[spec.name])
                if method in nulled:
                    values.update(null_checks(nulled[method][0], s.item["guide"], allmean, s.brain))
                _row(run, "fidelity_real", s, k, group, method, params, seconds, tk["best"], values)
        evaluate_noharm(s, allmean, gm, wm, tuned, models, opts, "noharm_real", run)
        log(f"fidelity real {s.name}: {time.perf_counter() - start:.0f}s")
    return placed


def evaluate_noharm(
    s: Series, reference, gm, wm, tuned: dict, models: Sequence[Model], opts: Options, label: str, run: Run
) -> None:
    """Every pair as input (k = all): tissue medians of the output against the input's."""
    n = s.num_pairs
    group = list(range(n))
    prep = core.prepare(s, group)
    _, tk = tuned_for(tuned, n)
    for method, (out, seconds, params) in run_methods(methods_for(s, group, n, tuned, models, opts.slow), prep).items():
        values = no_harm(prep["input_mean"], out, gm, wm)
        values["gm_wm_ratio_rel"] = tissue_ratio_rel(out, reference, gm, wm)
        if s.truth is not None:
            values["nmse_truth"] = nmse(out, s.truth, s.brain)
        _row(run, label, s, n, group, method, params, seconds, tk["best"], values)


def evaluate_sim(series: Sequence[Series], tuned: dict, models: Sequence[Model], opts: Options, run: Run, log) -> None:
    """Simulated subjects against the truth: the simulator's lesion CR, structure removed, tissue
    contrast, error (``fidelity_sim``); on the first ``check_series`` the perfusion-free check, no
    harm at k = all (``noharm_sim``) and on the clean truth as a 1- and 2-pair input (``clean_sim``)."""
    for si, s in enumerate(series[: opts.sim_series]):
        start = time.perf_counter()
        gm, wm = simulated_masks(s)
        kind = sim_lesion_kind(s)
        regions = sim_lesion_regions(s.lesion, s.brain, s.voxel) if kind in ("hypo", "hyper") else None
        check = si < opts.check_series
        pairs = s.item["pairs"]
        null = dataclasses.replace(s, item=dict(s.item, pairs=(pairs - s.truth[None]).astype(np.float32)))
        for k in opts.ks:
            if k >= s.num_pairs:
                continue
            group = list(range(k))
            _, tk = tuned_for(tuned, k)
            slow_ok = opts.slow and si < core.SLOW_SERIES
            prep = core.prepare(s, group)
            outs = run_methods(methods_for(s, group, k, tuned, models, slow_ok), prep)
            nulled = {}
            if check:
                prep_n = core.prepare(null, group)
                nulled = run_methods(methods_for(null, group, k, tuned, models, slow_ok), prep_n)
            for method, (out, seconds, params) in outs.items():
                values = {
                    "nmse_truth": nmse(out, s.truth, s.brain),
                    "level_ratio": float(out[s.brain].mean() / s.truth[s.brain].mean()),
                    "structure_removed": structure_removed(prep["input_mean"], out, s.truth, s.brain),
                    "gm_wm_ratio_rel": tissue_ratio_rel(out, s.truth, gm, wm),
                }
                if regions is not None:
                    values[f"cr_sim_{kind}"] = contrast_recovery(out, s.truth, [regions])
                if method in nulled:
                    values.update(null_checks(nulled[method][0], s.item["guide"], s.truth, s.brain))
                _row(run, "fidelity_sim", s, k, group, method, params, seconds, tk["best"], values)
        if check:
            evaluate_noharm(s, s.truth, gm, wm, tuned, models, opts, "noharm_sim", run)
            clean = dataclasses.replace(
                s, item=dict(s.item, pairs=np.repeat(s.truth[None], s.num_pairs, axis=0).astype(np.float32))
            )
            for k in (1, 2):
                group = list(range(k))
                prep = core.prepare(clean, group)
                _, tk = tuned_for(tuned, k)
                outs = run_methods(methods_for(clean, group, k, tuned, models, opts.slow), prep)
                for method, (out, seconds, params) in outs.items():
                    values = no_harm(prep["input_mean"], out, gm, wm)
                    values["nmse_truth"] = nmse(out, s.truth, s.brain)
                    values["gm_wm_ratio_rel"] = tissue_ratio_rel(out, s.truth, gm, wm)
                    _row(run, "clean_sim", s, k, group, method, params, seconds, tk["best"], values)
        log(f"fidelity sim {s.name}: {time.perf_counter() - start:.0f}s")


def evaluate(
    real: Sequence[Series],
    test: Sequence[Series],
    tuned: dict,
    models: Sequence[Model],
    opts: Options,
    run: Run,
    log,
) -> dict[str, Any]:
    """Every fidelity measurement; returns the settings and what was placed (for the JSON)."""
    keys: dict[str, str] = {}
    for model in models:
        model.fidelity_key = keys.setdefault(fingerprint(model), model.name)  # type: ignore[attr-defined]
    aliases = {m.name: m.fidelity_key for m in models if m.fidelity_key != m.name}  # type: ignore[attr-defined]
    if aliases:
        log(f"fidelity: identical networks computed once: {aliases}")
    placed = evaluate_real(real, tuned, models, opts, run, log)
    evaluate_sim(test, tuned, models, opts, run, log)
    return {
        "options": dataclasses.asdict(opts),
        "lesions": [dataclasses.asdict(s) for s in LESIONS],
        "identical_models": aliases,
        "placed": placed,
        "settings": settings(),
    }


def settings() -> dict[str, Any]:
    return {
        "lesion_planting": "pair + (gain - 1) x all-pair mean; gain = 1 + (factor - 1) x soft sphere (ramp EDGE voxel)",
        "edge_voxels": EDGE,
        "core": f"inside {CORE_FRACTION} x radius",
        "shell": "radius + EDGE/2 to radius + EDGE/2 + max(2, radius/2) voxels",
        "cr": "sum over an input's lesions of (shell - core) of the output / of the truth (all-pair mean with lesions)",
        "placement": {"hypo_band_pct": HYPO_BAND, "hyper_band_pct": HYPER_BAND, "gap_voxels": GAP},
        "distances": "physical, in units of the smallest in-plane voxel",
        "real_tissue_masks": {"gm_like_pct": GM_BAND, "wm_like_pct": WM_BAND, "of": "all-pair mean in the head"},
        "sim_tissue_masks": {"gm": f"probseg > {GM_THRESHOLD}", "wm": f"probseg > {WM_THRESHOLD}"},
        "structure_removed": "<in - out, ref> / (<ref, ref> - sum ref noise var) in the head (sim: truth)",
        "noharm_tol": NOHARM_TOL,
        "gauss_widths_inplane_vox": GAUSS_WIDTHS,
        "null_series": "real: pairs - all-pair mean; sim: pairs - truth; guide kept",
    }


# -------------------------------------------------------------------------------------- reporting
COLUMNS_REAL = (
    ("cr_hypo_r5", "CR hypo r5"),
    ("cr_hypo_r2.5", "CR hypo r2.5"),
    ("cr_hyper_r3.5", "CR hyper r3.5"),
    ("structure_removed", "structure removed"),
    ("gm_wm_ratio_rel", "GM/WM vs ref"),
    ("nmse_corrected", "NMSE (corr.)"),
    ("null_head_mean", "null: head mean"),
    ("null_corr_anatomy", "null: r(anatomy)"),
)
COLUMNS_SIM = (
    ("cr_sim_hypo", "CR lesion (hypo)"),
    ("cr_sim_hyper", "CR lesion (hyper)"),
    ("structure_removed", "structure removed"),
    ("gm_wm_ratio_rel", "GM/WM vs truth"),
    ("nmse_truth", "NMSE vs truth"),
    ("null_head_mean", "null: head mean"),
    ("null_corr_anatomy", "null: r(anatomy)"),
)


def _median(rows: Sequence[dict], column: str) -> float:
    values = np.asarray([r.get(column, math.nan) for r in rows], np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def method_rows(rows: Sequence[dict], dataset: str, k: int | None = None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["dataset"] == dataset and (k is None or r["k"] == k):
            out.setdefault(r["method"], []).append(r)
    return out


def best_gaussian(by_method: dict[str, list[dict]], metric: str) -> str | None:
    """The curve width of lowest median error."""
    curve = {m: _median(v, metric) for m, v in by_method.items() if m.startswith("gauss_")}
    curve = {m: e for m, e in curve.items() if np.isfinite(e)}
    return min(curve, key=curve.get) if curve else None


def table_methods(by_method: dict[str, list[dict]], metric: str | None, models: Sequence[str]) -> list[tuple[str, str]]:
    """(label, method) rows: mean, the best-error Gaussian of the curve (every width if no
    ``metric``), val-tuned, self-tuned, classical, models."""
    order = [("mean_k", "k-pair mean")]
    if metric is None:
        order += [(f"gauss_{w:g}", f"Gaussian {w:g} vox") for w in GAUSS_WIDTHS]
    elif best := best_gaussian(by_method, metric):
        order.append((best, f"Gaussian, best error ({best.removeprefix('gauss_')} vox)"))
    order += [("gaussian", "Gaussian, val-tuned"), ("gaussian_self", "Gaussian, self-tuned")]
    order += [(m, m) for m in ("guided", "nlm", "bm3d")] + [(m, f"model {m}") for m in models]
    return [(label, m) for m, label in order if m in by_method]


def tables(rows: Sequence[dict], ks: Sequence[int], models: Sequence[str]) -> str:
    """Markdown: per k, the real-scan and the simulated fidelity table (medians over inputs), then no harm."""
    fmt = core._fmt
    lines = []
    for k in ks:
        for dataset, cols, metric, what in (
            ("fidelity_real", COLUMNS_REAL, "nmse_corrected", "real long scans, planted lesions"),
            ("fidelity_sim", COLUMNS_SIM, "nmse_truth", "simulated test subjects"),
        ):
            by_method = method_rows(rows, dataset, k)
            if not by_method:
                continue
            n = len(by_method.get("mean_k", []))
            lines += [f"\n**k = {k}, {what}** (median over {n} inputs)\n"]
            lines += ["| method | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
            for label, m in table_methods(by_method, metric, models):
                lines.append(f"| {label} | " + " | ".join(fmt(_median(by_method[m], c)) for c, _ in cols) + " |")
    checks = [
        ("noharm_real", None, "every pair of each real series as input"),
        ("noharm_sim", None, "every pair (8) of simulated subjects"),
        *[("clean_sim", k, f"clean simulated input (the truth as {k} pair{'s' * (k > 1)})") for k in (1, 2)],
    ]
    for dataset, k, what in checks:
        by_method = method_rows(rows, dataset, k)
        if not by_method:
            continue
        lines += [f"\n**No harm: {what}** (median change of GM(-like) / WM(-like) medians; inputs within 5 %)\n"]
        lines += ["| method | GM change | WM change | GM/WM vs ref | within 5 % |", "|---|---|---|---|---|"]
        for label, m in table_methods(by_method, None, models):
            rs = by_method[m]
            ok = sum(r.get("noharm_ok", 0.0) == 1.0 for r in rs)
            cells = [fmt(_median(rs, c)) for c in ("noharm_gm_change", "noharm_wm_change", "gm_wm_ratio_rel")]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ok}/{len(rs)} |")
    return "\n".join(lines).lstrip("\n")


def figure(rows: Sequence[dict], path: Path, ks: Sequence[int], models: Sequence[str]) -> None:
    """Real scans: median corrected NMSE against median CR of the radius-5 hypo lesion, one panel per k;
    the Gaussian as a curve over its widths (from the k-pair mean, width 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [k for k in ks if method_rows(rows, "fidelity_real", k)]
    if not ks:
        return
    fig, axes = plt.subplots(1, len(ks), figsize=(4.6 * len(ks), 4.2), squeeze=False)
    x_col, y_col = "cr_hypo_r5", "nmse_corrected"
    markers = "os^vDP*Xhp"
    for ax, k in zip(axes[0], ks):
        by_method = method_rows(rows, "fidelity_real", k)
        point = {m: (_median(v, x_col), _median(v, y_col)) for m, v in by_method.items()}
        curve = ["mean_k"] + [f"gauss_{w:g}" for w in GAUSS_WIDTHS if f"gauss_{w:g}" in point]
        xs, ys = zip(*(point[m] for m in curve))
        ax.plot(xs, ys, "-", color="0.5", lw=1.2, zorder=1, label="Gaussian over widths")
        for m in curve:
            text = "mean" if m == "mean_k" else m.removeprefix("gauss_")
            ax.annotate(text, point[m], fontsize=7, color="0.35", xytext=(3, 3), textcoords="offset points")
        ax.scatter(xs, ys, s=14, color="0.5", zorder=2)
        others = ("gaussian", "gaussian_self", "guided", "nlm", "bm3d", *models)
        for i, m in enumerate(others):  # one style per method in every panel
            if m not in point:
                continue
            is_model = m in models
            ax.scatter(
                *point[m],
                s=60 if is_model else 36,
                marker=markers[i % len(markers)],
                color=f"C{i % 10}",
                zorder=3,
                label=f"model {m}"
                if is_model
                else {"gaussian": "Gaussian (val-tuned)", "gaussian_self": "Gaussian (self-tuned)"}.get(m, m),
            )
        ax.axvline(1.0, color="0.8", lw=0.8, zorder=0)
        n = len(by_method.get("mean_k", []))
        ax.set_title(f"k = {k} ({n} inputs, real scans)", fontsize=9)
        ax.set_xlabel("contrast recovery, hypo lesion r = 5 voxels (1 = kept)", fontsize=8)
        ax.set_ylabel("noise-corrected NMSE (median)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0, -1].legend(list(handles.values()), list(handles), fontsize=6.5, loc="best")
    fig.suptitle(
        "Real scans: error against contrast recovery of a planted hypoperfusion lesion (radius 5 voxels)\n"
        "ideal: CR 1 at low error; the grey curve is the Gaussian over its widths (in-plane sigma, voxels)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
