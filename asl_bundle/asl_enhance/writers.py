"""Ignite handler that writes each enhanced series: deltaM and CBF maps, sidecars, QC figure."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events

from .bids import ASLInputError, load_asl_series, load_nifti
from .failures import record_failure
from .items import batch_items, to_numpy, volume
from .outputs import safe_output_path, write_json, write_nifti, write_text
from .quantification import SeriesCBF, cbf_sidecar, find_tissue_maps, quantify_series, tissue_summary

logger = logging.getLogger("asl_enhance")


def _series_files(folder: Path, stem: str) -> list[Path]:
    """Files of one series in an output folder (``<stem>_*``)."""
    return [p for p in folder.iterdir() if p.name.startswith(f"{stem}_")] if folder.is_dir() else []


TISSUE_COLUMNS = ("series", "method", "gm_cbf_mean", "wm_cbf_mean", "gm_cbf_median", "wm_cbf_median", "tissue_source")
_METHOD_NAMES = {"enhanced": "enhanced", "mean": "mean", "all": "all_pairs_mean"}


def _all_pairs_mean(item: dict) -> np.ndarray | None:
    """Mean of every pair of the series when fewer were used (the QC reference); None otherwise."""
    if int(to_numpy(item["total_pairs"])) <= len(json.loads(item["input_pairs"])):
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
        for item in batch_items(engine):
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
        affine = np.asarray(to_numpy(item["affine"]), np.float64)
        outputs = {"enhanced": volume(item["pred"]), "mean": volume(item["input_mean"])}
        all_mean = _all_pairs_mean(item) if self.write_qc else None
        series_cbf = self._quantify(item, outputs, all_mean) if self.write_cbf else None
        paths = []
        for desc, data in outputs.items():
            path = safe_output_path(self.output_dir, item["rel_dir"], f"{item['stem']}_desc-{desc}_deltam.nii.gz")
            if path.exists() and not self.overwrite:
                raise FileExistsError(f"{path} exists (set overwrite to replace it)")
            write_nifti(path, data, affine)
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
        m0 = volume(item["guide"]) if item.get("guide_source") == "m0" else None
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

        used, total = len(json.loads(item["input_pairs"])), int(to_numpy(item["total_pairs"]))
        names = {"mean": f"{used}-pair mean", "enhanced": "enhanced", "all": f"all-pair mean ({total})"}
        deltam = {names["mean"]: outputs["mean"], names["enhanced"]: outputs["enhanced"]}
        if all_mean is not None:
            deltam[names["all"]] = all_mean
        cbf_maps = series_cbf.maps if series_cbf is not None else {}
        cbf = {names[k]: cbf_maps[k] for k in ("mean", "enhanced", "all") if k in cbf_maps}
        mask = volume(item["mask"]) > 0
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
            "TotalPairsInSeries": int(to_numpy(item["total_pairs"])),
            "PairsUsed": [i + 1 for i in used],
            "PairVolumeIndices": [volumes[i] for i in used],
            "M0Source": item.get("m0_source", ""),
            "GuideSource": item.get("guide_source", ""),
            "ScaleFactor": float(to_numpy(item["scale"])),
            "GeneratedBy": {"Name": "asl_bundle", "Version": self.version},
            "Settings": self.settings,
        }

    def _summary(self, engine: Engine) -> None:
        logger.info("wrote %d files under %s", len(self.written), self.output_dir)
        print(f"Enhanced {len(self.written) // 2} series; outputs under {self.output_dir.resolve()}")
