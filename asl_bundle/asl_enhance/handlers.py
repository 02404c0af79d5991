"""Ignite handlers with side effects: writing enhanced series (inference) and the evaluation CSV."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from . import metrics as asl_metrics
from .bids import ASLInputError, load_asl_series, load_nifti
from .failures import record_failure
from .outputs import safe_output_path, write_json, write_nifti, write_text
from .quantification import SeriesCBF, cbf_sidecar, find_tissue_maps, quantify_series, tissue_summary
from .smoothing import gaussian_smooth, self_tuned_sigma_mm, sigma_in_voxels

logger = logging.getLogger("asl_enhance")


def bundle_version(bundle_root: str | Path) -> str:
    """Version from the bundle's metadata.json (one place for it)."""
    meta = Path(bundle_root) / "configs" / "metadata.json"
    return str(json.loads(meta.read_text(encoding="utf-8"))["version"])


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _volume(value: Any) -> np.ndarray:
    """A 3D float32 volume from a (1, X, Y, Z) or (X, Y, Z) tensor/array."""
    arr = np.asarray(_numpy(value), dtype=np.float32)
    return arr[0] if arr.ndim == 4 else arr


def _voxel_sizes(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _items(engine: Engine) -> list[dict]:
    """Each series of the iteration: its (decollated) batch data with the network output merged in."""
    batch, output = engine.state.batch, engine.state.output
    batch = batch if isinstance(batch, list) else [batch]
    output = output if isinstance(output, list) else [output]
    return [{**b, **o} for b, o in zip(batch, output)]


def _series_files(folder: Path, stem: str) -> list[Path]:
    """Files of one series in an output folder (``<stem>_*``)."""
    return [p for p in folder.iterdir() if p.name.startswith(f"{stem}_")] if folder.is_dir() else []


TISSUE_COLUMNS = ("series", "method", "gm_cbf_mean", "wm_cbf_mean", "gm_cbf_median", "wm_cbf_median", "tissue_source")
_METHOD_NAMES = {"enhanced": "enhanced", "mean": "mean", "all": "all_pairs_mean"}


def _all_pairs_mean(item: dict) -> np.ndarray | None:
    """Mean of every pair of the series when fewer were used (the QC reference); None otherwise."""
    if int(_numpy(item["total_pairs"])) <= len(json.loads(item["input_pairs"])):
        return None
    return load_asl_series(item).pairs.mean(axis=0)


class ASLOutputWriter:
    """Writes ``<stem>_desc-enhanced_deltam.nii.gz`` (``pred``) and ``<stem>_desc-mean_deltam.nii.gz``
    (``input_mean``) with JSON sidecars under ``output_dir``, mirroring the input's folders."""

    def __init__(
        self,
        output_dir: str,
        bundle_version: str = "",
        settings: dict | None = None,
        overwrite: bool = True,
        write_cbf: bool = True,
        write_qc: bool = True,
    ):
        self.output_dir, self.version = Path(output_dir), bundle_version
        self.settings, self.overwrite = dict(settings or {}), overwrite
        self.write_cbf, self.write_qc = bool(write_cbf), bool(write_qc)
        self.written: list[Path] = []
        self.tissue_rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary)
        engine.add_event_handler(Events.COMPLETED, self.write_dataset_files)

    def __call__(self, engine: Engine) -> None:
        for item in _items(engine):
            if item.get("error"):
                continue  # a series that failed to load: SeriesFailureReport names it, nothing is written
            self._write_or_fail(engine, item)

    def _write_or_fail(self, engine: Engine, item: dict) -> None:
        """Write one series, refusing existing outputs unless ``overwrite``; a series that cannot be
        written completely has what it wrote removed and is recorded as failed."""
        try:
            folder = safe_output_path(self.output_dir, item["rel_dir"], f"{item['stem']}_asl").parent
            if not self.overwrite:
                for desc in ("enhanced", "mean"):
                    path = folder / f"{item['stem']}_desc-{desc}_deltam.nii.gz"
                    if path.exists():
                        raise FileExistsError(f"{path}: output exists (run with --overwrite true to replace it)")
            before = set(_series_files(folder, item["stem"]))
            try:
                self.write_series(item)
            except BaseException:
                for path in set(_series_files(folder, item["stem"])) - before:
                    path.unlink(missing_ok=True)
                raise
        except (ASLInputError, OSError, ValueError) as err:
            record_failure(engine, str(err))

    def write_series(self, item: dict) -> list[Path]:
        """Write both deltaM maps of one series; returns their paths."""
        affine = np.asarray(_numpy(item["affine"]), np.float64)
        outputs = {"enhanced": _volume(item["pred"]), "mean": _volume(item["input_mean"])}
        all_mean = _all_pairs_mean(item) if self.write_qc else None
        series_cbf = self._quantify(item, outputs, all_mean) if self.write_cbf else None
        paths = []
        for desc, volume in outputs.items():
            path = safe_output_path(self.output_dir, item["rel_dir"], f"{item['stem']}_desc-{desc}_deltam.nii.gz")
            if path.exists() and not self.overwrite:
                raise FileExistsError(f"{path} exists (set overwrite to replace it)")
            write_nifti(path, volume, affine)
            sidecar = {**self._sidecar(item, desc), **(series_cbf.deltam_fields() if series_cbf else {})}
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
            paths.append(path)
        self.written += paths
        tissue = self._write_cbf(item, series_cbf, affine) if series_cbf is not None and series_cbf.maps else {}
        if self.write_qc:
            self._write_qc(item, outputs, all_mean, series_cbf, tissue)
        return paths

    def _quantify(self, item: dict, outputs: dict, all_mean: np.ndarray | None) -> SeriesCBF:
        """CBF of the enhanced, k-pair and (for QC) all-pair means; M0 is the guide when it is M0."""
        m0 = _volume(item["guide"]) if item.get("guide_source") == "m0" else None
        deltam = dict(outputs) if all_mean is None else {**outputs, "all": all_mean}
        result = quantify_series(item, deltam, m0)
        if not result.maps:
            logger.warning("%s: no CBF (%s)", item["stem"], result.reason)
        return result

    def _write_cbf(self, item: dict, series_cbf: SeriesCBF, affine: np.ndarray) -> dict[str, dict]:
        """``<stem>_desc-{enhanced,mean}_cbf.nii.gz`` with sidecars; returns the tissue summaries
        (GM/WM CBF per map, also kept as rows of ``cbf_tissue.tsv``), {} without tissue maps."""
        assert series_cbf.params is not None
        source = str(Path(item["rel_dir"]) / Path(item["asl"]).name)
        for desc in ("enhanced", "mean"):
            path = safe_output_path(self.output_dir, item["rel_dir"], f"{item['stem']}_desc-{desc}_cbf.nii.gz")
            write_nifti(path, series_cbf.maps[desc], affine)
            what = "enhanced deltaM" if desc == "enhanced" else "plain mean of the pairs used"
            sidecar = cbf_sidecar(series_cbf.params, f"CBF from the {what}", source)
            sidecar.update(
                {k: v for k, v in self._sidecar(item, desc).items() if k not in ("Description", "Units", "Sources")}
            )
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
        maps, tissue_source = find_tissue_maps(item)
        if not maps:
            return {}
        gm, wm = (load_nifti(maps[t])[0] for t in ("GM", "WM"))
        if gm.shape != series_cbf.maps["mean"].shape or wm.shape != gm.shape:
            logger.warning("%s: tissue maps %s do not match the series; no tissue summary", item["stem"], gm.shape)
            return {}
        summaries = {desc: tissue_summary(cbf, gm, wm) for desc, cbf in series_cbf.maps.items()}
        for desc, summary in summaries.items():
            row = {"series": str(Path(item["rel_dir"]) / item["stem"]), "method": _METHOD_NAMES[desc]}
            self.tissue_rows.append({**row, **summary, "tissue_source": tissue_source})
        return summaries

    def _write_qc(
        self, item: dict, outputs: dict, all_mean: np.ndarray | None, series_cbf: SeriesCBF | None, tissue: dict
    ) -> None:
        """``<stem>_qc.png``: k-pair mean, enhanced, all-pair mean (if more pairs), change, CBF rows."""
        from .qc import write_qc_figure

        used, total = len(json.loads(item["input_pairs"])), int(_numpy(item["total_pairs"]))
        names = {"mean": f"{used}-pair mean", "enhanced": "enhanced", "all": f"all-pair mean ({total})"}
        deltam = {names["mean"]: outputs["mean"], names["enhanced"]: outputs["enhanced"]}
        if all_mean is not None:
            deltam[names["all"]] = all_mean
        cbf_maps = series_cbf.maps if series_cbf is not None else {}
        cbf = {names[k]: cbf_maps[k] for k in ("mean", "enhanced", "all") if k in cbf_maps}
        mask = _volume(item["mask"]) > 0
        if cbf:
            where = "GM" if tissue else "head"
            means = {
                k: tissue[k]["gm_cbf_mean"] if tissue else float(cbf_maps[k][mask & (cbf_maps[k] != 0)].mean())
                for k in ("enhanced", "mean")
            }
            cbf_text = f"mean {where} CBF: enhanced {means['enhanced']:.1f}, {used}-pair mean {means['mean']:.1f}"
            cbf_text += " ml/100g/min"
        else:
            cbf_text = f"no CBF: {series_cbf.reason if series_cbf else 'not requested'}"[:110]
        title = f"{Path(item['rel_dir']) / item['stem']}: {used} of {total} pairs used\n{cbf_text}"
        path = safe_output_path(self.output_dir, item["rel_dir"], f"{item['stem']}_qc.png")
        write_qc_figure(path, title, deltam, cbf or None, mask, deltam_units="control - label")

    def write_dataset_files(self, engine: Engine | None = None) -> None:
        """``dataset_description.json`` (BIDS derivative) and ``cbf_tissue.tsv`` at the output root."""
        description = {
            "Name": "ASL bundle outputs: enhanced deltaM and CBF",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "asl_bundle",
                    "Version": self.version,
                    "Description": "MONAI bundle: deep-learning enhancement of ASL deltaM, white-paper CBF",
                }
            ],
        }
        write_json(self.output_dir / "dataset_description.json", description)
        if self.tissue_rows:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=TISSUE_COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.tissue_rows)
            write_text(self.output_dir / "cbf_tissue.tsv", buffer.getvalue())

    def _sidecar(self, item: dict, desc: str) -> dict:
        used = json.loads(item["input_pairs"])
        volumes = json.loads(item["pair_volumes"])
        return {
            "Description": (
                "deltaM (control - label) enhanced by the ASL bundle's network"
                if desc == "enhanced"
                else "plain mean of the pair differences used (control - label)"
            ),
            "Units": "same as control - label of the source series",
            "Sources": [str(Path(item["rel_dir"]) / Path(item["asl"]).name)],
            "NumPairsUsed": len(used),
            "TotalPairsInSeries": int(_numpy(item["total_pairs"])),
            "PairsUsed": [i + 1 for i in used],
            "PairVolumeIndices": [volumes[i] for i in used],
            "M0Source": item.get("m0_source", ""),
            "GuideSource": item.get("guide_source", ""),
            "ScaleFactor": float(_numpy(item["scale"])),
            "GeneratedBy": {"Name": "asl_bundle", "Version": self.version},
            "Settings": self.settings,
        }

    def _summary(self, engine: Engine) -> None:
        logger.info("wrote %d files under %s", len(self.written), self.output_dir)
        print(f"Enhanced {len(self.written) // 2} series; outputs under {self.output_dir.resolve()}")


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
        for item in _items(engine):
            if item.get("error"):
                continue  # a series that failed to load: SeriesFailureReport names it
            self.rows += self.score_series(item)

    def score_series(self, item: dict) -> list[dict]:
        """One row per method for one series (all deltaM in the input's units)."""
        pairs = np.asarray(_numpy(item["pairs"]), np.float32)
        used = json.loads(item["input_pairs"])
        mask = _volume(item["mask"]) > 0
        reference, ref_var = _volume(item["other_mean"]), _volume(item["target_noise_var"])
        all_mean = pairs.mean(axis=0)
        single = asl_metrics.per_pair_nmse(_volume(item["pair_noise_var"]), reference, ref_var, mask)
        estimates, sigma = self._estimates(item, pairs[used], mask)
        rows = []
        for method, estimate in estimates.items():
            corrected = asl_metrics.nmse_corrected(estimate, reference, ref_var, mask)
            psnr, ssim = asl_metrics.psnr_ssim(estimate, reference, mask)
            rows.append(
                {
                    "series": str(Path(item["rel_dir"]) / item["stem"]),
                    "method": method,
                    "input_group": int(_numpy(item.get("input_group", 0))),
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
        estimates = {"enhanced": _volume(item["pred"]), "mean": _volume(item["input_mean"])}
        sigma: float | str = ""
        if "gaussian" in self.methods and used_pairs.shape[0] >= 2:
            voxels = _voxel_sizes(np.asarray(_numpy(item["affine"])))
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


class ResumableCheckpoint:
    """Saves model, optimizer, scheduler and trainer state at every epoch end to one file, written
    atomically; with ``resume`` it restores them when training starts, so a run killed mid-epoch
    continues from its last completed epoch. (MONAI's CheckpointSaver cannot hold the trainer it is
    attached to from a config without a circular reference.) ``final_filename``: when training
    completes (never on an error, unlike CheckpointSaver's ``save_final``), the network's weights
    alone go there too, so a finished schedule is the model."""

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        resume: bool = False,
        filename: str = "checkpoint.pt",
        enabled: bool = True,
        final_filename: str | None = None,
    ):
        self.path = Path(save_dir) / filename
        self.final_path = Path(save_dir) / final_filename if final_filename else None
        self.objects: dict[str, Any] = {"model": network, "optimizer": optimizer}
        if lr_scheduler is not None:
            self.objects["lr_scheduler"] = lr_scheduler
        self.resume, self.enabled = resume, enabled

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
            if self.final_path is not None:
                engine.add_event_handler(Events.COMPLETED, self.save_final)

    def load(self, engine: Engine | None = None) -> None:
        """Restore every object from the checkpoint file (clear error when it is missing)."""
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no checkpoint to resume from")
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        trainer = self.objects["trainer"]
        max_epochs = trainer.state.max_epochs  # the command's value wins over the checkpoint's
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        if max_epochs is not None:
            trainer.state.max_epochs = max_epochs
        done = trainer.state.iteration // max(1, trainer.state.epoch_length or 1)
        print(f"Resumed from {self.path} after epoch {done} of {trainer.state.max_epochs}", flush=True)

    def save(self, engine: Engine) -> None:
        _atomic_save({name: obj.state_dict() for name, obj in self.objects.items()}, self.path)

    def save_final(self, engine: Engine) -> None:
        assert self.final_path is not None
        _atomic_save(self.objects["model"].state_dict(), self.final_path)


def _atomic_save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state, tmp)
    tmp.replace(path)
