"""Ignite handler that writes each enhanced series: deltaM and CBF maps, sidecars, QC figure.

Each series is written whole into a private folder and then published (see :mod:`asl_enhance.outputs`):
it is complete or absent, a failed or concurrent run never deletes what it did not write, and
``skip_existing`` resumes a killed batch. The output folder is a BIDS derivative data set: the
``dataset_description.json`` links the raw data set (``DatasetLinks``, ``SourceDatasets``), sidecars
name their inputs as BIDS URIs, and a ``.bidsignore`` lists the files BIDS has no name for (deltaM and
CBF maps, QC figures, the tissue table), as ASLPrep does.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from .bids import ASLInputError, load_asl_series, load_nifti
from .failures import SeriesProgress, check_output_dir_or_exit, failure_line, record_failure, series_label
from .items import batch_items, to_numpy, volume
from .outputs import (
    OutputExistsError,
    publish_series,
    safe_output_path,
    series_complete,
    stage_series,
    write_json,
    write_nifti,
    write_text,
)
from .quantification import (
    CBF_UNITS_TEXT,
    SeriesCBF,
    cbf_sidecar,
    find_tissue_maps,
    find_truth_deltam,
    quantify_series,
    tissue_summary,
)

logger = logging.getLogger("asl_enhance")


#: what each deltaM map is, and its unit, in its sidecar
DELTAM_DESCRIPTIONS = {
    "enhanced": "deltaM (control - label) enhanced by the ASL bundle's network",
    "mean": "plain mean of the pair differences used (control - label)",
    "enhancedsd": "standard deviation of the enhanced deltaM per voxel (enhanced +- 1.96 SD: a 95% interval)",
}
DELTAM_UNITS = "same as control - label of the source series"
#: BIDS version the derivative data set follows
BIDS_VERSION = "1.9.0"
#: files of the output root that BIDS has no name for (listed in .bidsignore)
TISSUE_TABLE = "cbf_tissue.tsv"
BIDSIGNORE = ".bidsignore"
DESCRIPTION = "dataset_description.json"


def marker_name(stem: str) -> str:
    """The series file published last, listing the others: while it is missing the series is incomplete."""
    return f"{stem}_desc-enhanced_deltam.json"


def is_series_file(name: str, stem: str) -> bool:
    """Whether ``name`` is an output of series ``stem``: ``<stem>_desc-*`` or ``<stem>_<suffix>.<ext>``,
    but not a file of a longer stem such as ``<stem>_run-2_*``."""
    if not name.startswith(f"{stem}_"):
        return False
    first = name[len(stem) + 1 :].split("_", 1)[0]
    return first.startswith("desc-") or "-" not in first


def _series_files(folder: Path, stem: str) -> list[Path]:
    """Outputs of one series present in an output folder (see :func:`is_series_file`)."""
    return sorted(p for p in folder.iterdir() if is_series_file(p.name, stem)) if folder.is_dir() else []


def bids_uri(dataset: str, path: str | Path, root: str | Path | None) -> str:
    """``bids:<dataset>:<path relative to root>`` (BIDS URI); ``dataset`` "" is this derivative data set."""
    path = Path(path)
    if root is not None:
        try:
            path = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            pass
    return f"bids:{dataset}:{path.as_posix()}"


def raw_sources(item: dict, dataset_dir: str | Path | None = None) -> list[str]:
    """The raw files a series' outputs come from, as ``bids:raw:`` URIs: the ASL series and a separate
    M0 when there is one (paths relative to the item's data set, else to ``dataset_dir``)."""
    root = item.get("dataset_dir") or dataset_dir
    files = [item["asl"]] + ([item["m0scan"]] if item.get("m0scan") else [])
    if root is None:
        return [bids_uri("raw", Path(item["rel_dir"]) / Path(f).name, None) for f in files]
    return [bids_uri("raw", f, root) for f in files]


def bidsignore_pattern(name: str, at_root: bool) -> str:
    """The .bidsignore line of a file BIDS has no name for: every file of its suffix, or the root file."""
    if at_root:
        return f"/{name}"
    return "*_" + name.rsplit("_", 1)[-1]


def bidsignore_lines(existing: str, names_by_root: dict[bool, set[str]]) -> list[str]:
    """The .bidsignore of the output folder: what it already listed (earlier runs) plus a pattern for
    every file of this run that BIDS has no name for (all but dataset_description.json)."""
    lines = [line for line in existing.splitlines() if line.strip()]
    for at_root, names in names_by_root.items():
        for name in sorted(names):
            if name in (DESCRIPTION, BIDSIGNORE):
                continue
            pattern = bidsignore_pattern(name, at_root)
            if pattern not in lines and not any(fnmatch.fnmatch(name, p.lstrip("/")) for p in lines):
                lines.append(pattern)
    return lines


#: S (the k-pair mean's energy over its noise twin's at the restore's coarsest band) below which the
#: enhanced sidecar warns that the pairs show little or no perfusion: at 2 pairs S is 6-420 on real and
#: simulated scans that show perfusion and 0.5-5 on an artefact-dominated 2D PASL scan and on phantoms
#: (studies/noise_gated_restore)
PERFUSION_WARNING_RATIO = 4.0

TISSUE_COLUMNS = ("series", "method", "gm_cbf_mean", "wm_cbf_mean", "gm_cbf_median", "wm_cbf_median", "tissue_source")
_METHOD_NAMES = {"enhanced": "enhanced", "mean": "mean", "all": "all_pairs_mean", "truth": "truth"}


def _all_pairs(item: dict) -> np.ndarray | None:
    """Every pair of the series when fewer were used (the QC reference); None otherwise."""
    if int(to_numpy(item["total_pairs"])) <= len(json.loads(item["input_pairs"])):
        return None
    return load_asl_series(item).pairs


def unused_pairs_line(item: dict, outputs: dict[str, np.ndarray], pairs: np.ndarray | None) -> str:
    """For a long scan (at least 2 pairs left unused), what the QC title says the enhanced map did, against
    the mean of the unused pairs: the noise-corrected error of it and of the plain mean, their GM-like/WM-like
    contrast over the reference's and the share of its perfusion pattern the map took out (the evaluation's
    :class:`~asl_enhance.evaluation.FidelityScorer`, so the figure and ``evaluation.csv`` agree); "" otherwise."""
    from .evaluation import FidelityScorer
    from .metrics import nmse_corrected

    used = json.loads(item["input_pairs"])
    if pairs is None or pairs.shape[0] - len(used) < 2:
        return ""
    pairs = np.asarray(pairs)
    rest = pairs[np.setdiff1d(np.arange(pairs.shape[0]), used)]
    reference, ref_var = rest.mean(axis=0), rest.var(axis=0, ddof=1) / rest.shape[0]
    scorer = FidelityScorer(item, pairs.mean(axis=0))
    enhanced, mean = outputs["enhanced"], outputs["mean"]
    errors = [nmse_corrected(v, reference, ref_var, scorer.head) for v in (enhanced, mean)]
    contrast = [scorer(mean, v, reference, ref_var)["gm_wm_ratio_rel"] for v in (enhanced, mean)]
    removed = scorer(mean, enhanced, reference, ref_var)["structure_removed"]
    return (
        f"vs the {rest.shape[0]} unused pairs: error {errors[0]:.2f} ({len(used)}-pair mean {errors[1]:.2f}), "
        f"GM/WM-like contrast {contrast[0]:.2f} of theirs ({contrast[1]:.2f}), pattern taken out {removed:.2f}"
    )


def _truth_deltam(item: dict, shape: tuple[int, ...]) -> np.ndarray | None:
    """The simulator's noise-free deltaM of the series (QC reference), None without one or on another grid."""
    path, _ = find_truth_deltam(item)
    if path is None:
        return None
    truth = load_nifti(path)[0]
    if truth.shape != shape:
        logger.warning("%s: %s has shape %s, the series %s; no truth row", item["stem"], path, truth.shape, shape)
        return None
    return truth


class ASLOutputWriter:
    """Writes ``<stem>_desc-enhanced_deltam.nii.gz`` (``pred``) and ``<stem>_desc-mean_deltam.nii.gz``
    (``input_mean``) with JSON sidecars under ``output_dir``, mirroring the input's folders, plus CBF
    maps and a QC figure; each series complete or absent.

    A series with outputs already there is refused unless ``overwrite`` (replace them) or
    ``skip_existing`` (keep a complete series, redo an incomplete one: some of its files without the
    marker that lists them all, as a killed run leaves it). With ``dataset_dir`` (the command line)
    the output folder is checked before any series runs (:func:`~asl_enhance.failures.check_output_dir_or_exit`).
    """

    def __init__(
        self,
        output_dir: str,
        bundle_version: str = "",
        settings: dict | None = None,
        overwrite: bool = True,
        write_cbf: bool = True,
        write_qc: bool = True,
        skip_existing: bool = False,
        dataset_dir: str | None = None,
    ):
        self.output_dir, self.version = Path(output_dir), bundle_version
        self.settings, self.overwrite, self.skip_existing = dict(settings or {}), overwrite, bool(skip_existing)
        self.write_cbf, self.write_qc = bool(write_cbf), bool(write_qc)
        self.dataset_dir = None if dataset_dir is None else Path(dataset_dir)
        self.written: list[Path] = []  # every file this run published, dataset files included
        self.series_written: list[str] = []
        self.series_skipped: list[str] = []
        self.tissue_rows: list[dict] = []
        self.progress = SeriesProgress()
        if self.dataset_dir is not None:
            check_output_dir_or_exit(self.output_dir, self.dataset_dir)

    def attach(self, engine: Engine) -> None:
        self.progress.attach(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write_dataset_files)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def __call__(self, engine: Engine) -> None:
        for item in batch_items(engine):
            if self.dataset_dir is None and item.get("dataset_dir"):
                self.dataset_dir = Path(item["dataset_dir"])
            if item.get("error"):
                # a series that failed to load: SeriesFailureReport names it, nothing is written
                self.progress.report(engine, item, "FAILED to load")
                continue
            self.progress.report(engine, item, self._write_or_fail(engine, item))

    def pending(self, items: Sequence[dict]) -> list[dict]:
        """The series still to run. With ``skip_existing`` a series whose outputs are complete is left
        out here, before it is loaded or enhanced, so resuming a batch costs only what is missing."""
        if not self.skip_existing:
            return list(items)
        todo = []
        for item in items:
            if self._complete(item):
                self.series_skipped.append(series_label(item))
                print(f"[skipped] {series_label(item)}: outputs complete (skip_existing)", flush=True)
            else:
                todo.append(item)
        return todo

    def finish(self) -> None:
        """End a run that had nothing left to enhance: the data set files and the summary line."""
        self.write_dataset_files()
        self._summary()

    def _folder(self, item: dict) -> Path:
        """The series' output folder (mirrors its input folder; refuses a path that leaves output_dir)."""
        return safe_output_path(self.output_dir, item["rel_dir"], marker_name(item["stem"])).parent

    def _complete(self, item: dict) -> bool:
        try:
            folder = self._folder(item)
        except (KeyError, ValueError):  # not a series this writer can place: the run reports it
            return False
        return series_complete(folder, marker_name(item["stem"]))

    def _write_or_fail(self, engine: Engine, item: dict) -> str:
        """Write one series whole or not at all (a failure is recorded with a line naming the series'
        file); returns what happened, for the progress line."""
        stem = item["stem"]
        try:
            folder = self._folder(item)
            present = _series_files(folder, stem)
            if present and self.skip_existing and series_complete(folder, marker_name(stem)):
                self.series_skipped.append(series_label(item))
                logger.info("%s: outputs complete, skipped (skip_existing)", series_label(item))
                return "skipped, outputs complete"
            if present and not (self.overwrite or self.skip_existing):
                enhanced = folder / f"{stem}_desc-enhanced_deltam.nii.gz"
                raise OutputExistsError(enhanced if enhanced in present else present[0])
            paths = self.write_series(item, replace=bool(present) or self.overwrite)
            return f"written, {len(paths)} files" + (
                " (incomplete outputs redone)" if present and not self.overwrite else ""
            )
        except OutputExistsError as err:
            advice = "--overwrite true replaces it, --skip_existing true keeps a complete series"
            record_failure(engine, f"{item['asl']}: output exists: {err.filename} ({advice})")
        except (ASLInputError, OSError, ValueError) as err:
            record_failure(engine, failure_line(item, err))
        return "FAILED"

    def write_series(self, item: dict, replace: bool | None = None) -> list[Path]:
        """Write every output of one series into a private folder, then publish them together
        (:func:`~asl_enhance.outputs.publish_series`; ``replace`` defaults to ``overwrite``); returns
        the published paths."""
        replace = self.overwrite if replace is None else replace
        stem = item["stem"]
        folder = self._folder(item)
        with stage_series(self.output_dir) as stage:
            tissue_rows = self._write_series_files(item, stage)
            staged = safe_output_path(stage, item["rel_dir"], marker_name(stem)).parent
            paths = publish_series(staged, folder, marker_name(stem), replace)
        self.written += paths
        self.series_written.append(series_label(item))
        self.tissue_rows += tissue_rows
        return paths

    def _write_series_files(self, item: dict, root: Path) -> list[dict]:
        """Every output of one series under ``root`` (its staging folder); returns its tissue rows."""
        affine = np.asarray(to_numpy(item["affine"]), np.float64)
        outputs = {"enhanced": volume(item["pred"]), "mean": volume(item["input_mean"])}
        all_pairs = _all_pairs(item) if self.write_qc else None
        references = {} if all_pairs is None else {"all": all_pairs.mean(axis=0)}
        truth = _truth_deltam(item, outputs["mean"].shape) if self.write_qc else None
        references.update({} if truth is None else {"truth": truth})
        series_cbf = self._quantify(item, outputs, references) if self.write_cbf else None
        for desc, data in outputs.items():
            path = safe_output_path(root, item["rel_dir"], f"{item['stem']}_desc-{desc}_deltam.nii.gz")
            write_nifti(path, data, affine)
            sidecar = {**self._sidecar(item, desc), **(series_cbf.deltam_fields() if series_cbf else {})}
            sidecar.update(self._sd_fields(item) if desc == "enhanced" else {})
            sidecar.update(scan_test_fields(item, self.settings) if desc == "enhanced" else {})
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
        tissue, rows = {}, []
        if series_cbf is not None and series_cbf.maps:
            tissue, rows = self._write_cbf(item, series_cbf, affine, root)
        sd_maps = self._write_sd(item, series_cbf, affine, root) if item.get("pred_sd") is not None else {}
        if self.write_qc:
            self._write_qc(item, outputs, references, series_cbf, tissue, root, sd_maps, all_pairs)
        return rows

    def _quantify(self, item: dict, outputs: dict, references: dict[str, np.ndarray]) -> SeriesCBF:
        """CBF of the enhanced and k-pair means and (for QC) of the references (all-pair mean, truth);
        M0 is the guide when it is M0."""
        m0 = volume(item["guide"]) if item.get("guide_source") == "m0" else None
        result = quantify_series(item, {**outputs, **references}, m0)
        if not result.maps:
            logger.warning("%s: no CBF (%s)", item["stem"], result.reason)
        return result

    def _write_cbf(
        self, item: dict, series_cbf: SeriesCBF, affine: np.ndarray, root: Path
    ) -> tuple[dict[str, dict], list[dict]]:
        """``<stem>_desc-{enhanced,mean}_cbf.nii.gz`` with sidecars under ``root``; returns the tissue
        summaries (GM/WM CBF per map) and their rows of ``cbf_tissue.tsv``, empty without tissue maps."""
        assert series_cbf.params is not None
        for desc in ("enhanced", "mean"):
            name = f"{item['stem']}_desc-{desc}_cbf.nii.gz"
            path = safe_output_path(root, item["rel_dir"], name)
            write_nifti(path, series_cbf.maps[desc], affine)
            what = "enhanced deltaM" if desc == "enhanced" else "plain mean of the pairs used"
            deltam = (Path(item["rel_dir"]) / f"{item['stem']}_desc-{desc}_deltam.nii.gz").as_posix()
            sidecar = cbf_sidecar(series_cbf.params, f"CBF from the {what}", deltam)
            sidecar.update(
                {"Units": CBF_UNITS_TEXT, "Sources": [bids_uri("", deltam, None), *raw_sources(item, self.dataset_dir)]}
            )
            sidecar.update(
                {k: v for k, v in self._sidecar(item, desc).items() if k not in ("Description", "Units", "Sources")}
            )
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
        maps, tissue_source = find_tissue_maps(item)
        if not maps:
            return {}, []
        gm, wm = (load_nifti(maps[t])[0] for t in ("GM", "WM"))
        if gm.shape != series_cbf.maps["mean"].shape or wm.shape != gm.shape:
            logger.warning("%s: tissue maps %s do not match the series; no tissue summary", item["stem"], gm.shape)
            return {}, []
        summaries = {desc: tissue_summary(cbf, gm, wm) for desc, cbf in series_cbf.maps.items()}
        rows = []
        for desc, summary in summaries.items():
            row = {"series": str(Path(item["rel_dir"]) / item["stem"]), "method": _METHOD_NAMES[desc]}
            rows.append({**row, **summary, "tissue_source": tissue_source})
        return summaries, rows

    def _write_qc(
        self,
        item: dict,
        outputs: dict,
        references: dict[str, np.ndarray],
        series_cbf: SeriesCBF | None,
        tissue: dict,
        root: Path,
        sd_maps: dict[str, np.ndarray] | None = None,
        all_pairs: np.ndarray | None = None,
    ) -> None:
        """``<stem>_qc.png``: k-pair mean, enhanced, all-pair mean (if more pairs), the simulator's truth (if
        the data set has it), change, SD, CBF rows; a long scan's title also says, against its unused pairs,
        the error and the contrast kept (:func:`unused_pairs_line`)."""
        from .qc import write_qc_figure

        used, total = len(json.loads(item["input_pairs"])), int(to_numpy(item["total_pairs"]))
        names = {
            "mean": f"{used}-pair mean",
            "enhanced": "enhanced",
            "all": f"all-pair mean ({total})",
            "truth": "truth (simulation)",
        }
        deltam = {names["mean"]: outputs["mean"], names["enhanced"]: outputs["enhanced"]}
        deltam.update({names[k]: references[k] for k in ("all", "truth") if k in references})
        cbf_maps = series_cbf.maps if series_cbf is not None else {}
        cbf = {names[k]: cbf_maps[k] for k in ("mean", "enhanced", "all", "truth") if k in cbf_maps}
        mask = volume(item["mask"]) > 0
        if cbf:
            where = "GM" if tissue else "head"
            means = {
                k: tissue[k]["gm_cbf_mean"] if tissue else float(cbf_maps[k][mask & (cbf_maps[k] != 0)].mean())
                for k in ("enhanced", "mean")
            }
            cbf_text = f"mean {where} CBF: enhanced {means['enhanced']:.1f}, {used}-pair mean {means['mean']:.1f}"
            if "truth" in cbf_maps and tissue:
                cbf_text += f", truth {tissue['truth']['gm_cbf_mean']:.1f}"
            cbf_text += f" {CBF_UNITS_TEXT}"
        else:
            cbf_text = f"no CBF: {series_cbf.reason if series_cbf else 'not requested'}"[:110]
        averaged = pairs_averaged(item)
        each = f" (each the scanner's mean of {averaged:g})" if averaged > 1 else ""
        title = f"{Path(item['rel_dir']) / item['stem']}: {used} of {total} pairs used{each}\n{cbf_text}"
        reference_text = unused_pairs_line(item, outputs, all_pairs)
        title += f"\n{reference_text}" if reference_text else ""
        if averaged > 1 and used == 1:
            title += "\none averaged volume: its noise cannot be measured; smoothed as one pair's (see sidecar)"
        path = safe_output_path(root, item["rel_dir"], f"{item['stem']}_qc.png")
        twin = volume(item["input_twin"]) if item.get("input_twin") is not None else None
        write_qc_figure(path, title, deltam, cbf or None, mask, "control - label", sd_maps, twin)

    def write_dataset_files(self, engine: Engine | None = None) -> None:
        """``dataset_description.json`` (BIDS derivative, linked to the raw data set), ``cbf_tissue.tsv``
        and ``.bidsignore`` at the output root; in a run (``engine``), failing to write them is
        recorded as a failure instead of a traceback. Not where this run wrote no series into a folder
        without them (every series failed): a data set description of nothing would be all it holds."""
        wrote = self.series_written or self.series_skipped or self.tissue_rows
        if not (wrote or (self.output_dir / DESCRIPTION).exists()):
            return
        try:
            self._write_dataset_files()
        except OSError as err:
            if engine is None:
                raise
            record_failure(engine, f"{self.output_dir}: data set files not written: {err}")

    def _write_dataset_files(self) -> None:
        description = {
            "Name": "ASL bundle outputs: enhanced deltaM and CBF",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "asl_bundle",
                    "Version": self.version,
                    "Description": "MONAI bundle: deep-learning enhancement of ASL deltaM, white-paper CBF",
                }
            ],
            **self._source_dataset_fields(),
        }
        series_names = {p.name for p in self.written if p.name not in (DESCRIPTION, TISSUE_TABLE, BIDSIGNORE)}
        write_json(self.output_dir / DESCRIPTION, description)
        root_names = [DESCRIPTION]
        if self.tissue_rows:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=TISSUE_COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self._earlier_tissue_rows() + self.tissue_rows)
            write_text(self.output_dir / TISSUE_TABLE, buffer.getvalue())
            root_names.append(TISSUE_TABLE)
        self.written += [self.output_dir / name for name in root_names]
        ignore = self.output_dir / BIDSIGNORE
        existing = ignore.read_text(encoding="utf-8") if ignore.is_file() else ""
        lines = bidsignore_lines(existing, {False: series_names, True: set(root_names)})
        if "\n".join(lines) != existing.strip():
            write_text(ignore, "\n".join(lines) + "\n")
            self.written.append(ignore)

    def _earlier_tissue_rows(self) -> list[dict]:
        """Rows of ``cbf_tissue.tsv`` that earlier runs wrote for series this run did not write (kept, so a
        resumed or partial rerun does not drop them); none when the table is missing or not ours."""
        try:
            with open(self.output_dir / TISSUE_TABLE, newline="", encoding="utf-8") as table:
                rows = list(csv.DictReader(table, delimiter="\t"))
        except (OSError, csv.Error, UnicodeDecodeError):
            return []
        if not rows or tuple(rows[0]) != TISSUE_COLUMNS:
            return []
        now = {row["series"] for row in self.tissue_rows} | set(self.series_written)
        return [row for row in rows if row["series"] not in now]

    def _source_dataset_fields(self) -> dict:
        """``DatasetLinks`` (what ``bids:raw:`` in the sidecars' ``Sources`` points to) and
        ``SourceDatasets``, with the raw data set's DOI, version and licence when it states them."""
        if self.dataset_dir is None:
            return {}
        uri = self.dataset_dir.resolve().as_uri()
        source, fields = {"URL": uri}, {}
        try:
            raw = json.loads((self.dataset_dir / "dataset_description.json").read_text(encoding="utf-8")[:1_000_000])
        except (OSError, ValueError):
            raw = {}
        raw = raw if isinstance(raw, dict) else {}
        for key, field in (("DatasetDOI", "DOI"), ("DatasetVersion", "Version")):
            if isinstance(raw.get(key), str):
                source[field] = raw[key]
        if isinstance(raw.get("License"), str):
            fields["License"] = raw["License"]
        return {"DatasetLinks": {"raw": uri}, "SourceDatasets": [source], **fields}

    def _sd_fields(self, item: dict) -> dict:
        """What the enhanced deltaM's sidecar says about its SD map: the file, or why there is none."""
        if item.get("pred_sd") is not None:
            return {"UncertaintyMap": f"{item['stem']}_desc-enhancedsd_deltam.nii.gz"}
        return {"UncertaintyMapNotWrittenReason": item["pred_sd_note"]} if item.get("pred_sd_note") else {}

    def _write_sd(self, item: dict, series_cbf: SeriesCBF | None, affine: np.ndarray, root: Path) -> dict:
        """``<stem>_desc-enhancedsd_deltam.nii.gz`` (``pred_sd``, from :mod:`~asl_enhance.uncertainty`) and,
        where CBF is written, ``<stem>_desc-enhancedsd_cbf.nii.gz`` (CBF is linear in deltaM per voxel:
        the SD times the voxel's |CBF / deltaM| factor), with sidecars; returns the maps for the QC figure."""
        from .quantification import compute_cbf

        sd = volume(item["pred_sd"])
        maps = {"deltaM SD": sd}
        info = json.loads(item.get("pred_sd_info") or "{}")
        common = {k: v for k, v in self._sidecar(item, "enhanced").items() if k not in ("Description", "Units")}
        enhanced = (Path(item["rel_dir"]) / f"{item['stem']}_desc-enhanced_deltam.nii.gz").as_posix()
        what = {
            "deltam": DELTAM_DESCRIPTIONS["enhancedsd"],
            "cbf": "standard deviation of the enhanced CBF per voxel (the deltaM SD times |CBF / deltaM|)",
        }
        units = {"deltam": DELTAM_UNITS, "cbf": CBF_UNITS_TEXT}
        if series_cbf is not None and series_cbf.maps and series_cbf.params is not None:
            m0 = volume(item["guide"]) if item.get("guide_source") == "m0" else None
            maps["CBF SD"] = np.abs(compute_cbf(sd, m0, series_cbf.params))
        for kind, data in (("deltam", sd), ("cbf", maps.get("CBF SD"))):
            if data is None:
                continue
            path = safe_output_path(root, item["rel_dir"], f"{item['stem']}_desc-enhancedsd_{kind}.nii.gz")
            write_nifti(path, data, affine)
            sidecar = {
                "Description": what[kind],
                "Units": units[kind],
                **common,
                "Sources": [bids_uri("", enhanced, None), *raw_sources(item, self.dataset_dir)],
                **info,
            }
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
        return maps

    def _sidecar(self, item: dict, desc: str) -> dict:
        used = json.loads(item["input_pairs"])
        volumes = json.loads(item["pair_volumes"])
        return {
            "Description": DELTAM_DESCRIPTIONS[desc],
            "Units": DELTAM_UNITS,
            "Sources": raw_sources(item, self.dataset_dir),
            "NumPairsUsed": len(used),
            "TotalPairsInSeries": int(to_numpy(item["total_pairs"])),
            **averaged_pairs_field(item),
            "PairsUsed": [i + 1 for i in used],
            "PairVolumeIndices": [volumes[i] for i in used],
            "M0Source": item.get("m0_source", ""),
            "GuideSource": item.get("guide_source", ""),
            "ScaleFactor": float(to_numpy(item["scale"])),
            "GeneratedBy": {"Name": "asl_bundle", "Version": self.version},
            "Settings": self.settings,
        }

    def _summary(self, engine: Engine | None = None) -> None:
        """Series and files this run actually wrote (a failed series counts in neither)."""
        logger.info("wrote %d files under %s", len(self.written), self.output_dir)
        skipped = f", skipped {len(self.series_skipped)} already complete" if self.series_skipped else ""
        print(
            f"Enhanced {len(self.series_written)} series ({len(self.written)} file"
            f"{'' if len(self.written) == 1 else 's'} written{skipped}); "
            f"outputs under {self.output_dir.resolve()}",
            flush=True,
        )


def pairs_averaged(item: dict) -> float:
    """How many acquired pairs each pair of the item's file averages (``TotalAcquiredPairs``; 1 without it)."""
    return float(to_numpy(item.get("pairs_averaged", 1.0)))


def averaged_pairs_field(item: dict) -> dict:
    """``AcquiredPairsPerPair`` where each pair of the file averages several acquired ones, else nothing."""
    averaged = pairs_averaged(item)
    return {"AcquiredPairsPerPair": round(averaged, 3)} if averaged > 1 else {}


def network_head(guide: Any, input_mean: np.ndarray) -> np.ndarray | None:
    """The head the network measures its scan test in (:meth:`ScaleMixingEnhancer.head`): the guide at its
    head-mean scale above HEAD_GUIDE_LEVEL; ``None`` (every voxel) without a guide, as the network does."""
    from .networks import HEAD_GUIDE_LEVEL
    from .transforms import guide_scale

    if guide is None:
        return None
    guide = volume(guide)
    if not np.any(guide > 0):
        return None
    level, _ = guide_scale(guide, input_mean)
    head = guide / level > HEAD_GUIDE_LEVEL
    return head if head.any() else None


def scan_test_fields(item: dict, settings: dict) -> dict:
    """k >= 2: S, how far the input stands above its noise twin at the restore's coarsest band (the
    network's scan test, in the network's own head: the S the option acts on), and below
    :data:`PERFUSION_WARNING_RATIO` a note and a logged warning: the pairs show little or no perfusion, so
    what the restore gives back is noise or artefact (or, with ``restore_scan_test`` on, the map leans on a
    blur the network chose). ``settings``: ``restore_bands`` and ``restore_scan_test`` as in inference.json."""
    bands = settings.get("restore_bands") or []
    if not bands or item.get("input_twin") is None:
        return averaged_volume_fields(item)
    from .networks import input_perfusion_ratio

    mean = volume(item["input_mean"])
    ratio = input_perfusion_ratio(mean, volume(item["input_twin"]), bands[0], network_head(item.get("guide"), mean))
    fields = {"InputPerfusionToNoise": round(ratio, 3)}
    if ratio < PERFUSION_WARNING_RATIO:
        tested = float(settings.get("restore_scan_test") or 0) > 1
        what = (
            "the enhanced map leans on a blur the network chose (restore_scan_test)"
            if tested
            else "what the enhanced map gives back is mostly their noise or artefact (--restore_scan_test 4 "
            "gives a blur the network chose instead)"
        )
        note = (
            f"the {len(json.loads(item['input_pairs']))} pairs used show {'little' if ratio > 1.5 else 'no'} "
            f"perfusion above their noise (S = {ratio:.2f}, below {PERFUSION_WARNING_RATIO:g}): {what}; "
            "compare with the plain mean, use more pairs, or check the pairs for motion"
        )
        fields["InputPerfusionNote"] = note
        logger.warning("%s: %s", item["stem"], note)
    return fields


def averaged_volume_fields(item: dict) -> dict:
    """One input volume that already averages several acquired pairs (TotalAcquiredPairs): a note and a
    logged warning. Without a second volume there is no noise twin, so the network takes the volume for one
    pair's noise and smooths it as such, however clean it is (studies/single_pair_gate: half of a real 2D
    pCASL scan, 25 pairs, given as one volume: error 0.60 against the input's 0.048; as two volumes 0.051)."""
    averaged = pairs_averaged(item)
    if averaged <= 1 or len(json.loads(item["input_pairs"])) != 1:
        return {}
    note = (
        f"one input volume that averages {averaged:g} acquired pairs: without a second volume the noise cannot be "
        "measured, so the enhanced map treats it as one pair's noise and smooths a clean map as a noisy one; "
        "compare with the plain mean, and where the scanner can export its averages as two or more volumes (or "
        "the pairs), give those"
    )
    logger.warning("%s: %s", item["stem"], note)
    return {"InputAveragedPairsNote": note}


def series_maps(result: dict) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """For :func:`write_deltam_maps` (the MONAI Deploy app): the maps of one series (``enhanced``, ``mean``
    and, where k >= 2, ``enhancedsd``) and the fields only one map's sidecar gets: the SD map's method
    (``sd_fields``), and on the enhanced map the SD map's name or why there is none, as the bundle's own
    writer says it, and ``perfusion_fields`` (:func:`scan_test_fields`) on the enhanced map."""
    maps = {desc: result[desc] for desc in ("enhanced", "mean")}
    sd_fields = dict(result.get("sd_fields") or {})
    perfusion = dict(result.get("perfusion_fields") or {})  # scan_test_fields, the enhanced map's
    if result.get("enhancedsd") is None:
        return maps, {"enhanced": {**sd_fields, **perfusion}}
    maps["enhancedsd"] = result["enhancedsd"]
    return maps, {
        "enhanced": {"UncertaintyMap": f"{result['stem']}_desc-enhancedsd_deltam.nii.gz", **perfusion},
        "enhancedsd": sd_fields,
    }


def write_deltam_maps(
    output_dir: str | Path,
    item: dict,
    maps: dict[str, np.ndarray],
    affine: np.ndarray,
    fields: dict,
    replace: bool = True,
    map_fields: dict[str, dict] | None = None,
) -> list[Path]:
    """``<stem>_desc-<desc>_deltam.nii.gz`` and sidecar for each of ``maps`` (``enhanced`` and
    ``mean``) of one series (``item``: ``asl``, ``rel_dir``, ``stem``, optionally ``dataset_dir`` and
    ``m0scan``), complete or absent as the bundle's writer publishes them; the MONAI Deploy app's
    writer, a plain function so that it is tested without the App SDK. ``map_fields``: sidecar fields of
    one map only (by desc). Returns the published paths."""
    sources = raw_sources(item)
    stem = item["stem"]
    folder = safe_output_path(output_dir, item["rel_dir"], marker_name(stem)).parent
    with stage_series(output_dir) as stage:
        for desc, data in maps.items():
            path = safe_output_path(stage, item["rel_dir"], f"{stem}_desc-{desc}_deltam.nii.gz")
            write_nifti(path, data, affine)
            sidecar = {
                "Description": DELTAM_DESCRIPTIONS[desc],
                "Units": DELTAM_UNITS,
                "Sources": sources,
                **fields,
                **(map_fields or {}).get(desc, {}),
            }
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
        staged = safe_output_path(stage, item["rel_dir"], marker_name(stem)).parent
        return publish_series(staged, folder, marker_name(stem), replace)
