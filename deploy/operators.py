"""MONAI Deploy operators for the ASL bundle: a BIDS-ASL / NIfTI series finder, the SDK's bundle inference
operator adapted to ASL series and float outputs, and a NIfTI writer that keeps the input's affine.

Why not the stock operators alone: the SDK's ``NiftiDataLoader`` drops the affine and knows nothing of
aslcontext.tsv (which volumes are control, label, M0), its ``MonaiBundleInferenceOperator`` casts "image"
outputs to uint8 (deltaM is signed float), and the wheel has no NIfTI writer.

One bad series never stops the others: each operator processes its series one by one
(:func:`asl_enhance.failures.process_each_series`) and adds a line naming the file of each one that
failed to the app's shared ``failures`` list; the app exits with status 1 when it is not empty.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from asl_enhance.bids import ASL_SUFFIXES, find_asl_series, parse_num_pairs
from asl_enhance.failures import process_each_series
from asl_enhance.writers import scan_test_fields, series_maps, write_deltam_maps
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.core.io_type import IOType
from monai.deploy.operators.monai_bundle_inference_operator import (
    DISALLOW_LOAD_SAVE,
    IOMapping,
    MonaiBundleInferenceOperator,
)

logger = logging.getLogger("asl_deploy")


def list_series(input_path: str | Path) -> list[dict[str, str]]:
    """Data items of every BIDS-ASL series under a folder, or of one ``*_asl.nii[.gz]`` file (its
    ``*_aslcontext.tsv`` beside it, as BIDS requires)."""
    path = Path(input_path)
    if path.is_file():
        if not path.name.endswith(ASL_SUFFIXES):
            raise ValueError(f"{path}: expected a BIDS-ASL series named *_asl.nii or *_asl.nii.gz")
        items = [i for i in find_asl_series(path.parent) if Path(i["asl"]) == path]
        if not items:
            raise ValueError(f"{path}: no {path.name.split('_asl.nii')[0]}_aslcontext.tsv beside it")
        return items
    items = find_asl_series(path)
    if not items:
        raise ValueError(f"{path}: no *_asl.nii[.gz] with an *_aslcontext.tsv found")
    return items


class ASLSeriesLoaderOperator(Operator):
    """Emits the data items (paths and BIDS context, no voxels yet) of the series in ``input_path``;
    an input with no series is a failure (added to ``failures``) and an empty list."""

    def __init__(
        self, fragment: Fragment, *args: Any, input_path: Path, failures: list[str] | None = None, **kwargs: Any
    ):
        self.input_path = Path(input_path)
        self.failures = failures if failures is not None else []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("series")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        try:
            items = list_series(self.input_path)
        except (ValueError, OSError) as err:
            self.failures.append(" ".join(str(err).split()))
            logger.error("no series: %s", self.failures[-1])
            items = []
        logger.info("found %d ASL series under %s", len(items), self.input_path)
        op_output.emit(items, "series")


class ASLBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator (it parses extra/inference.json in model.ts for device, inferer, pre- and
    postprocessing, and loads the TorchScript network) run on whole ASL series.

    Its preprocessing keeps the bundle's own reader (LoadASLSeriesd: the SDK drops only LoadImage/SaveImage),
    so inputs are formed exactly as ``monai.bundle run`` forms them. Outputs stay float32 and carry the affine
    (the parent's ``_send_output`` would cast an "image" to uint8). ``ASL_NUM_PAIRS`` (environment) sets how
    many pairs to use, like the bundle's ``--num_pairs``; default all.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        num_pairs: int | None = None,
        failures: list[str] | None = None,
        **kwargs: Any,
    ):
        self.num_pairs = num_pairs
        self.failures = failures if failures is not None else []
        kwargs.setdefault("input_mapping", [IOMapping("series", object, IOType.IN_MEMORY)])
        kwargs.setdefault("output_mapping", [IOMapping("pred", object, IOType.IN_MEMORY)])
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("series")
        spec.output("pred")

    def _init_config(self, config_names: Any) -> None:
        super()._init_config(config_names)
        if self.num_pairs is not None:  # rebuild the preprocessing with the bundle's num_pairs overridden
            self.parser["num_pairs"] = int(self.num_pairs)
            self._preproc = self._get_compose(self._bundle_config_names.preproc_name, DISALLOW_LOAD_SAVE)

    def _ensure_model(self) -> None:
        """Bundle config and network from the app context's model (``-m``/HOLOSCAN_MODEL_PATH), else from
        ``bundle_path``: the same order as the parent's compute."""
        if self._model_network is not None:
            return
        model = self.app_context.models.get(self._model_name) if self.app_context.models else None
        if model is not None:
            if not self._init_completed:
                self.bundle_path = Path(model.path)
                self._init_config(self._bundle_config_names.config_names)
                self._init_completed = True
            self._model_network = torch.jit.load(str(model.path), map_location=self._device).eval()
        elif self.bundle_path and self.bundle_path.is_file():
            if not self._init_completed:
                self._init_config(self._bundle_config_names.config_names)
                self._init_completed = True
            self._model_network = torch.jit.load(str(self.bundle_path), map_location=self._device).eval()
        else:
            raise OSError("no model: pass -m model.ts or set HOLOSCAN_MODEL_PATH")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        self._ensure_model()
        results, failed = process_each_series(op_input.receive("series"), self._enhance, "not processed")
        self.failures += failed
        self._send_output(results, "pred", {}, op_output, context)

    def _enhance(self, item: dict) -> dict:
        """One series through the bundle's preprocessing, the network and its postprocessing."""
        data = self.pre_process(dict(item))
        if data.get("error"):  # the bundle's reader refused it: its line names the file
            raise ValueError(data["error"])
        image = torch.as_tensor(np.asarray(data["image"]), dtype=torch.float32)[None].to(self._device)
        with torch.no_grad():
            num_pairs = torch.tensor([int(data["num_pairs_used"])], device=self._device)  # as the evaluator
            pred = self.predict(image, num_pairs=num_pairs)  # (1, 1, X, Y, Z) in the network's units
        sd, sd_fields = self.parser.get_parsed_content("uncertainty").item_sd(self._model_network, data, image, pred)
        out = self.post_process(pred[0], **{self.kw_preprocessed_inputs: data})
        settings = {key: self.parser[key] for key in ("restore_bands", "restore_scan_test")}
        return {**self._result(data, out["pred"], sd, sd_fields), "perfusion_fields": scan_test_fields(data, settings)}

    @staticmethod
    def _result(data: dict, pred: Any, sd: np.ndarray | None = None, sd_fields: dict | None = None) -> dict:
        """What the writer needs of one series: the maps (the SD map where k >= 2), its BIDS context."""
        volume = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        return {
            "enhanced": volume[0].astype(np.float32),
            "enhancedsd": sd,
            "sd_fields": dict(sd_fields or {}),
            "mean": np.asarray(data["input_mean"], np.float32),
            "affine": np.asarray(data["affine"], np.float64),
            "rel_dir": data["rel_dir"],
            "stem": data["stem"],
            "asl": data["asl"],
            "dataset_dir": data.get("dataset_dir", ""),
            "m0scan": data.get("m0scan", ""),
            "pairs_used": [i + 1 for i in json.loads(data["input_pairs"])],
            "total_pairs": int(data["total_pairs"]),
        }

    def _send_output(self, value: Any, name: str, metadata: dict, op_output: Any, context: Any) -> None:
        """Emit as is: float32 volumes with their affine (no uint8 cast, no axis swap)."""
        op_output.emit(value, name)


class ASLNiftiWriterOperator(Operator):
    """Writes ``<rel_dir>/<stem>_desc-{enhanced,mean}_deltam.nii.gz`` (float32, the input's affine) and a
    JSON sidecar, mirroring the input's folders as the bundle's inference does; each series complete or
    absent (:func:`asl_enhance.writers.write_deltam_maps`)."""

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_path: Path,
        version: str = "",
        failures: list[str] | None = None,
        **kwargs: Any,
    ):
        self.output_path, self.version = Path(output_path), version
        self.failures = failures if failures is not None else []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        written, failed = process_each_series(op_input.receive("pred"), self._write, "outputs not written")
        self.failures += failed
        logger.info("wrote %d series under %s", len(written), self.output_path)

    def _write(self, result: dict) -> list[Path]:
        fields = {
            "PairsUsed": result["pairs_used"],
            "TotalPairsInSeries": result["total_pairs"],
            "GeneratedBy": {"Name": "asl_bundle MONAI Deploy app", "Version": self.version},
        }
        maps, map_fields = series_maps(result)
        return write_deltam_maps(self.output_path, result, maps, result["affine"], fields, map_fields=map_fields)


def num_pairs_from_env() -> int | None:
    """``ASL_NUM_PAIRS`` as the bundle's ``--num_pairs`` reads it (unset, empty or "all" = every pair); anything
    but a whole number stops the app with one line, before any data is read."""
    try:
        return parse_num_pairs(os.environ.get("ASL_NUM_PAIRS", ""))
    except ValueError as err:
        raise SystemExit(f"ERROR: ASL_NUM_PAIRS: {err}") from None
