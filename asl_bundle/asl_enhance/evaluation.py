"""Ignite handler that scores each series against its unused pairs and writes ``evaluation.csv``."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from . import metrics as asl_metrics
from .failures import EXIT_NO_INPUT, SeriesProgress, check_output_dir_or_exit
from .fidelity import LESIONS, contrast_recovery, lesion_regions, quantile_masks, structure_removed, tissue_ratio_rel
from .items import batch_items, to_numpy, volume, voxel_sizes
from .outputs import write_text
from .smoothing import gaussian_smooth, self_tuned_sigma_mm, sigma_in_voxels
from .transforms import guide_scale

#: contrast recovery of each planted lesion kind (``evaluate_lesions.json``; empty without lesions)
FIDELITY_CR_COLUMNS = tuple(f"cr_{spec.name}" for spec in LESIONS)
#: scores reduced over input groups (median) and series (mean)
SCORE_KEYS = ("nmse_all", "nmse_other", "nmse_corrected", "psnr", "ssim")
#: fidelity scores (:class:`FidelityScorer`), reduced alike where a row has them
FIDELITY_KEYS = ("structure_removed", "gm_wm_ratio_rel", *FIDELITY_CR_COLUMNS)
EVALUATION_COLUMNS = (
    "series",
    "method",
    "num_pairs",
    "total_pairs",
    "num_groups",
    "nmse_all",
    "nmse_other",
    "nmse_corrected",
    "effective_pairs",
    "effective_pairs_min",
    "effective_pairs_max",
    "psnr",
    "ssim",
    "gaussian_sigma_mm",
    "sd_coverage_95",
    "sd_mean_z2",
    *FIDELITY_KEYS,
)
#: the SD map's scores (enhanced only, where ``pred_sd`` exists; see :func:`sd_scores`)
SD_COLUMNS = ("sd_coverage_95", "sd_mean_z2")


class ASLEvaluationWriter:
    """Scores ``enhanced`` (``pred``), ``mean`` (``input_mean``) and the self-tuned ``gaussian``
    against the mean of all pairs and of the unused pairs (noise-corrected), and writes
    ``evaluation.csv`` with a row per series and method plus an ``ALL`` row per method. With disjoint
    input groups (``SelectPairsd`` mode ``groups``) a series' row holds the median over its groups
    (robust to one group's motion or drift). Its effective pairs are the n at which the same scan's
    n-pair mean reaches the median error (:func:`~asl_enhance.metrics.pairs_for_error` on the
    series' :func:`~asl_enhance.metrics.mean_error_curve`), with the lowest and highest over its
    groups beside it. Every row also holds :class:`FidelityScorer`'s scores (structure removed, tissue
    contrast, and each planted lesion kind's contrast recovery where ``evaluate_lesions.json`` planted them).
    With ``dataset_dir`` (the command line) the output folder gets the inference run's checks, and an
    existing table is kept unless ``overwrite``."""

    def __init__(
        self,
        output_dir: str,
        methods: Sequence[str] = ("enhanced", "mean", "gaussian"),
        filename: str = "evaluation.csv",
        dataset_dir: str | None = None,
        overwrite: bool = True,
    ):
        self.path = Path(output_dir) / filename
        if dataset_dir is not None:  # the command line: the inference run's checks, before any series runs
            check_output_dir_or_exit(output_dir, dataset_dir)
        if not overwrite and self.path.exists():
            print(f"ERROR: {self.path} exists (--overwrite true replaces it)", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_NO_INPUT)
        self.methods = tuple(methods)
        self.rows: list[dict] = []
        self.pair_values: dict[str, np.ndarray] = {}  # per series: its pairs inside the mask
        self.curves: dict[str, asl_metrics.MeanErrorCurve] = {}  # per series: its n-pair mean's error
        self.progress = SeriesProgress()

    def attach(self, engine: Engine) -> None:
        self.progress.attach(engine)
        engine.add_event_handler(
            Events.EPOCH_STARTED, lambda _: (self.rows.clear(), self.curves.clear(), self.pair_values.clear())
        )
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def __call__(self, engine: Engine) -> None:
        items = batch_items(engine)
        for item in items:
            if item.get("error"):
                continue  # a series that failed to load: SeriesFailureReport names it
            self.rows += self.score_series(item)
        if items:  # the input groups of one series arrive together: one progress line for them
            failed = any(item.get("error") for item in items)
            self.progress.report(engine, items[0], "FAILED to load" if failed else f"scored, {len(items)} groups")

    def score_series(self, item: dict) -> list[dict]:
        """One row per method for one series (all deltaM in the input's units)."""
        pairs = np.asarray(to_numpy(item["pairs"]), np.float32)
        used = json.loads(item["input_pairs"])
        mask = volume(item["mask"]) > 0
        reference, ref_var = volume(item["other_mean"]), volume(item["target_noise_var"])
        all_mean = pairs.mean(axis=0)
        series = str(Path(item["rel_dir"]) / item["stem"])
        if series not in self.pair_values:  # once per series: all its pairs, for the n-pair mean's error curve
            self.pair_values[series] = pairs[:, mask][:, :, None, None]
        estimates, sigma = self._estimates(item, pairs[used], mask)
        fidelity = FidelityScorer(item, all_mean)
        rows = []
        for method, estimate in estimates.items():
            corrected = asl_metrics.nmse_corrected(estimate, reference, ref_var, mask)
            psnr, ssim = asl_metrics.psnr_ssim(estimate, reference, mask)
            rows.append(
                {
                    "series": series,
                    "method": method,
                    "input_group": int(to_numpy(item.get("input_group", 0))),
                    "num_pairs": len(used),
                    "total_pairs": pairs.shape[0],
                    "num_groups": 1,
                    "nmse_all": asl_metrics.nmse(estimate, all_mean, mask),
                    "nmse_other": asl_metrics.nmse(estimate, reference, mask),
                    "nmse_corrected": corrected,
                    "psnr": psnr,
                    "ssim": ssim,
                    "gaussian_sigma_mm": sigma if method == "gaussian" else "",
                    **(sd_scores(item, estimate, reference, ref_var, mask) if method == "enhanced" else {}),
                    **fidelity(volume(item["input_mean"]), estimate, reference, ref_var),
                }
            )
        return rows

    def _estimates(self, item: dict, used_pairs: np.ndarray, mask: np.ndarray) -> tuple[dict, float | str]:
        estimates = {"enhanced": volume(item["pred"]), "mean": volume(item["input_mean"])}
        sigma: float | str = ""
        if "gaussian" in self.methods and used_pairs.shape[0] >= 2:
            voxels = voxel_sizes(np.asarray(to_numpy(item["affine"])))
            sigma = self_tuned_sigma_mm(used_pairs, voxels, mask)
            estimates["gaussian"] = gaussian_smooth(estimates["mean"], sigma_in_voxels(sigma, voxels))
        return {k: v for k, v in estimates.items() if k in self.methods}, sigma

    def _curve(self, series: str, num_groups: int) -> asl_metrics.MeanErrorCurve:
        """The series' n-pair mean curve over as many groups as its methods were scored on."""
        if series not in self.curves:
            values = self.pair_values[series]
            mask = np.ones(values.shape[1:], bool)
            self.curves[series] = asl_metrics.mean_error_curve(values, mask, max_groups=num_groups)
        return self.curves[series]

    def series_rows(self) -> list[dict]:
        """One row per series and method: the median over its input groups of every score; the
        effective pairs of the median error on the series' n-pair mean curve, and the lowest and
        highest of its groups' effective pairs (their spread)."""
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in self.rows:
            groups.setdefault((row["series"], row["method"]), []).append(row)
        result = []
        for (series, _), rows in groups.items():
            merged = dict(rows[0], num_groups=len(rows))
            merged.pop("input_group", None)
            for key in SCORE_KEYS:
                merged[key] = float(np.median([r[key] for r in rows]))
            if merged["gaussian_sigma_mm"] != "":
                merged["gaussian_sigma_mm"] = float(np.median([r["gaussian_sigma_mm"] for r in rows]))
            curve = self._curve(series, len(rows))
            merged["effective_pairs"] = asl_metrics.pairs_for_error(curve, merged["nmse_corrected"])
            per_group = [asl_metrics.pairs_for_error(curve, r["nmse_corrected"]) for r in rows]
            merged["effective_pairs_min"], merged["effective_pairs_max"] = min(per_group), max(per_group)
            merged.update(_reduce(rows, SD_COLUMNS, np.median))
            merged.update(_reduce(rows, FIDELITY_KEYS, np.nanmedian))  # a ratio is NaN where WM reads 0
            result.append(merged)
        return result

    def write(self, engine: Engine | None = None) -> None:
        """Write the CSV (atomically) and print a one-line summary per method."""
        series = self.series_rows()
        if not series:  # every series failed: SeriesFailureReport names them; no header-only table
            print(f"No series scored: {self.path} not written")
            return
        totals = self._totals(series)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=EVALUATION_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(series + totals)
        write_text(self.path, buffer.getvalue())
        summary = ", ".join(
            f"{r['method']}: NMSE(corrected) {r['nmse_corrected']:.4f}, effective pairs {r['effective_pairs']:.2f}"
            for r in totals
        )
        print(f"Scored {len({r['series'] for r in series})} series -> {self.path.resolve()} | {summary}")

    def _totals(self, series_rows: list[dict]) -> list[dict]:
        totals = []
        for method in self.methods:
            rows = [r for r in series_rows if r["method"] == method]
            if not rows:
                continue
            total = {
                "series": "ALL",
                "method": method,
                "num_pairs": rows[0]["num_pairs"],
                "total_pairs": "",
                "num_groups": "",
                "gaussian_sigma_mm": "",
                "effective_pairs_min": "",
                "effective_pairs_max": "",
            }
            for key in SCORE_KEYS:
                total[key] = float(np.mean([r[key] for r in rows]))
            total["effective_pairs"] = float(np.median([r["effective_pairs"] for r in rows]))
            total.update(_reduce(rows, SD_COLUMNS, np.mean))
            total.update(_reduce(rows, FIDELITY_KEYS, np.nanmean))
            totals.append(total)
        return totals


def local_reference_variance(ref_var: np.ndarray) -> np.ndarray:
    """The reference's noise variance averaged over the SD map's window (uncertainty.WINDOW). Per voxel
    it comes from the few unused pairs (chi-square with N - k - 1 degrees of freedom); z^2 divides by
    it, and dividing by a noisy variance inflates z^2 (without bound for 2 reference pairs), while the
    local average, like the SD map itself, has many degrees of freedom."""
    from .uncertainty import WINDOW

    return gaussian_smooth(np.asarray(ref_var, np.float32), WINDOW)


def sd_scores(
    item: dict, estimate: np.ndarray, reference: np.ndarray, ref_var: np.ndarray, mask: np.ndarray
) -> dict[str, float]:
    """How well the enhanced map's SD (``pred_sd``) covers its error against the unused pairs' mean,
    whose own noise variance ``ref_var`` (locally averaged, :func:`local_reference_variance`) is
    added: the fraction of head voxels with |error| <= 1.96 * sqrt(sd^2 + ref_var) (0.95 when
    calibrated) and the mean z^2 (1 when calibrated); {} without a map."""
    if item.get("pred_sd") is None:
        return {}
    variance = volume(item["pred_sd"]).astype(np.float64) ** 2 + local_reference_variance(ref_var)
    z2 = (np.asarray(estimate, np.float64) - reference)[mask] ** 2 / np.maximum(variance[mask], 1e-30)
    return {"sd_coverage_95": float(np.mean(z2 <= 1.96**2)), "sd_mean_z2": float(np.mean(z2))}


def _reduce(rows: list[dict], keys: Sequence[str], reduce) -> dict[str, float]:
    """``keys`` of several rows reduced (median over input groups, mean over series) over the rows that
    have them (the SD scores: enhanced only; lesion CR: planted series only); a key none has is left out."""
    return {
        key: float(reduce([r[key] for r in rows if r.get(key, "") != ""]))
        for key in keys
        if any(r.get(key, "") != "" for r in rows)
    }


class FidelityScorer:
    """What a reader looks at, beside the error (issue 17; the measures of :mod:`asl_enhance.fidelity`):
    ``structure_removed`` (the share of the reference's perfusion pattern the method took out of its
    input), ``gm_wm_ratio_rel`` (its GM-like/WM-like median ratio over the reference's; masks from
    percentile bands of the all-pair mean) and, where :class:`~asl_enhance.transforms.PlantLesionsd`
    planted lesions, each kind's contrast recovery against the planted all-pair mean (1: kept). Masks
    from the all-pair mean and the guide, as the benchmark's (one head for every input group)."""

    def __init__(self, item: dict, all_mean: np.ndarray):
        guide = item.get("guide")  # without one (an item built by hand): the item's own head mask
        self.head = guide_scale(volume(guide), all_mean)[1] if guide is not None else volume(item["mask"]) > 0
        self.gm, self.wm = quantile_masks(all_mean, self.head)
        self.truth = all_mean
        self.regions: dict[str, list] = {}
        if item.get("lesions"):
            tissue = volume(item["lesion_tissue"]) > 0.5
            voxels = voxel_sizes(np.asarray(to_numpy(item["affine"])))
            specs = {spec.name: spec for spec in LESIONS}
            for name, _, _, centre in json.loads(item["lesions"]):
                spec = specs[name]
                self.regions.setdefault(f"cr_{name}", []).append(
                    lesion_regions(all_mean.shape, centre, spec, voxels, tissue)
                )

    def __call__(self, input_mean: np.ndarray, estimate: np.ndarray, reference: np.ndarray, ref_var: np.ndarray):
        scores = {
            "structure_removed": structure_removed(input_mean, estimate, reference, self.head, ref_var),
            "gm_wm_ratio_rel": tissue_ratio_rel(estimate, reference, self.gm, self.wm),
        }
        for column, regions in self.regions.items():
            scores[column] = contrast_recovery(estimate, self.truth, regions)
        return scores
