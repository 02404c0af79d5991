"""Ignite handler that scores each series against its unused pairs and writes ``evaluation.csv``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from . import metrics as asl_metrics
from .items import batch_items, to_numpy, volume, voxel_sizes
from .outputs import write_text
from .smoothing import gaussian_smooth, self_tuned_sigma_mm, sigma_in_voxels

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
    "psnr",
    "ssim",
    "gaussian_sigma_mm",
)


class ASLEvaluationWriter:
    """Scores ``enhanced`` (``pred``), ``mean`` (``input_mean``) and the self-tuned ``gaussian``
    against the mean of all pairs and of the unused pairs (noise-corrected), and writes
    ``evaluation.csv`` with a row per series and method plus an ``ALL`` row per method. With disjoint
    input groups (``SelectPairsd`` mode ``groups``) a series' row holds the median over its groups,
    and its effective pairs come from the median error (robust to one group's motion or drift)."""

    def __init__(
        self,
        output_dir: str,
        methods: Sequence[str] = ("enhanced", "mean", "gaussian"),
        filename: str = "evaluation.csv",
    ):
        self.path = Path(output_dir) / filename
        self.methods = tuple(methods)
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def __call__(self, engine: Engine) -> None:
        for item in batch_items(engine):
            if item.get("error"):
                continue  # a series that failed to load: SeriesFailureReport names it
            self.rows += self.score_series(item)

    def score_series(self, item: dict) -> list[dict]:
        """One row per method for one series (all deltaM in the input's units)."""
        pairs = np.asarray(to_numpy(item["pairs"]), np.float32)
        used = json.loads(item["input_pairs"])
        mask = volume(item["mask"]) > 0
        reference, ref_var = volume(item["other_mean"]), volume(item["target_noise_var"])
        all_mean = pairs.mean(axis=0)
        single = asl_metrics.per_pair_nmse(volume(item["pair_noise_var"]), reference, ref_var, mask)
        estimates, sigma = self._estimates(item, pairs[used], mask)
        rows = []
        for method, estimate in estimates.items():
            corrected = asl_metrics.nmse_corrected(estimate, reference, ref_var, mask)
            psnr, ssim = asl_metrics.psnr_ssim(estimate, reference, mask)
            rows.append(
                {
                    "series": str(Path(item["rel_dir"]) / item["stem"]),
                    "method": method,
                    "input_group": int(to_numpy(item.get("input_group", 0))),
                    "single_pair_nmse": single,
                    "num_pairs": len(used),
                    "total_pairs": pairs.shape[0],
                    "num_groups": 1,
                    "nmse_all": asl_metrics.nmse(estimate, all_mean, mask),
                    "nmse_other": asl_metrics.nmse(estimate, reference, mask),
                    "nmse_corrected": corrected,
                    "effective_pairs": asl_metrics.effective_pairs(corrected, single),
                    "psnr": psnr,
                    "ssim": ssim,
                    "gaussian_sigma_mm": sigma if method == "gaussian" else "",
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

    def series_rows(self) -> list[dict]:
        """One row per series and method: the median over its input groups of every score, the
        effective pairs from the median error and the median single-pair error."""
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in self.rows:
            groups.setdefault((row["series"], row["method"]), []).append(row)
        result = []
        for rows in groups.values():
            merged = dict(rows[0], num_groups=len(rows))
            merged.pop("input_group", None)
            for key in ("nmse_all", "nmse_other", "nmse_corrected", "psnr", "ssim", "single_pair_nmse"):
                merged[key] = float(np.median([r[key] for r in rows]))
            if merged["gaussian_sigma_mm"] != "":
                merged["gaussian_sigma_mm"] = float(np.median([r["gaussian_sigma_mm"] for r in rows]))
            single = merged["single_pair_nmse"]
            merged["effective_pairs"] = asl_metrics.effective_pairs(merged["nmse_corrected"], single)
            result.append(merged)
        return result

    def write(self, engine: Engine | None = None) -> None:
        """Write the CSV (atomically) and print a one-line summary per method."""
        series = self.series_rows()
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
            }
            for key in ("nmse_all", "nmse_other", "nmse_corrected", "psnr", "ssim"):
                total[key] = float(np.mean([r[key] for r in rows]))
            total["effective_pairs"] = float(np.median([r["effective_pairs"] for r in rows]))
            totals.append(total)
        return totals
