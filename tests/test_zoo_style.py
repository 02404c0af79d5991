"""MONAI Model Zoo conformance, offline: the checks of the zoo's ci/verify_bundle.py (full mode) re-done with
MONAI's public bundle API, and a unit test in the zoo's ci/unit_tests style (ConfigWorkflow initialize,
check_properties, run, finalize on generated data). scripts/verify_zoo.sh runs the zoo's own script where
GitHub is reachable; CI has no GitHub, hence this file."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import BUNDLE, CONFIGS, ROOT, write_phantom_dataset
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

MAX_FILE_BYTES = 25 * 1024 * 1024  # the zoo's limit for a file kept in the repository
# The zoo's CI downloads the schema named in metadata.json; offline, a copy can be pointed to
SCHEMA_CANDIDATES = [os.environ.get("ASL_META_SCHEMA", ""), str(ROOT.parent / "shared/schemas/meta_schema.json")]
SCHEMA = next((Path(p) for p in SCHEMA_CANDIDATES if p and Path(p).is_file()), None)


def metadata() -> dict:
    return json.loads((CONFIGS / "metadata.json").read_text())


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """The bundle as the zoo checks it, in a scratch folder (the checks write models/verify_model.ts);
    fresh weights when models/model.pt is not trained yet."""
    dest = tmp_path / "models" / "asl_bundle"
    shutil.copytree(BUNDLE, dest, ignore=shutil.ignore_patterns("__pycache__", "checkpoint.pt", "*.ts"))
    if not (dest / "models" / "model.pt").is_file():
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "inference.json"))
        (dest / "models").mkdir(exist_ok=True)
        torch.save(parser.get_parsed_content("network_def").state_dict(), dest / "models" / "model.pt")
    return dest


# ------------------------------------------------------------------------ verify_bundle.py, full mode


def test_directory():
    for name in ("configs/metadata.json", "LICENSE", "configs/inference.json", "docs/data_license.txt"):
        assert (BUNDLE / name).is_file(), name
    large = [p for p in BUNDLE.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]
    listed = any((BUNDLE / f"large_files.{s}").is_file() for s in ("yml", "yaml", "json"))
    assert not large or listed, f"files over 25 MB need large_files.yml: {large}"


def test_version_and_changelog():
    meta = metadata()
    assert meta["version"] in meta["changelog"]


@pytest.mark.skipif(SCHEMA is None or importlib.util.find_spec("jsonschema") is None,
                    reason="no local copy of meta_schema_20220324.json (ASL_META_SCHEMA) or no jsonschema")  # fmt: skip
def test_metadata_schema(tmp_path):
    target = tmp_path / "schema.json"
    shutil.copy(SCHEMA, target)
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(target))  # raises when invalid


def test_metadata_fields():
    """What the schema requires and the zoo's tools read, without the schema file."""
    meta = metadata()
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright",
                "network_data_format"):  # fmt: skip
        assert key in meta, key
    fmt = meta["network_data_format"]
    for io, key in (("inputs", "image"), ("outputs", "pred")):
        spec = fmt[io][key]
        for field in ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
                      "channel_def"):  # fmt: skip
            assert field in spec, (io, field)


def test_net_in_out(bundle_copy):
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle_copy / "configs" / "metadata.json"),
        config_file=str(bundle_copy / "configs" / "inference.json"),
        bundle_root=str(bundle_copy),
    )


def test_torchscript_export(bundle_copy):
    ts = bundle_copy / "models" / "verify_model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(bundle_copy / "models" / "model.pt"),
        meta_file=str(bundle_copy / "configs" / "metadata.json"),
        config_file=str(bundle_copy / "configs" / "inference.json"),
        bundle_root=str(bundle_copy),
    )
    torch.jit.load(str(ts))
    shipped = BUNDLE / "models" / "model.ts"
    if shipped.is_file():  # the zoo loads a provided model.ts too
        torch.jit.load(str(shipped))


# ------------------------------------------------------------------------ ci/unit_tests style


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """Random-ish BIDS-ASL series, as the zoo's unit tests write random NIfTI."""
    root = tmp_path_factory.mktemp("zoo_data")
    write_phantom_dataset(root, 5, (20, 18, 8), num_pairs=4, first_seed=20, alternate_order=True)
    return root


def check_workflow(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    missing = workflow.check_properties()
    assert not missing, f"missing properties: {missing}"
    workflow.run()
    workflow.finalize()


def workflow(kind: str, config_file: list[str] | str, **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        workflow_type=kind,
        config_file=config_file,
        logging_file=str(CONFIGS / "logging.conf"),
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(BUNDLE),
        **override,
    )


def test_train_and_evaluate_config(dataset_dir, tmp_path):
    override = {
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(tmp_path / "ckpt"),
        "output_dir": str(tmp_path / "runs"),
        "max_epochs": 1,
        "val_interval": 1,
        "cache_rate": 0.0,
        "patch_size": [16, 16, 4],
        "batch_size": 2,
        "samples_per_series": 2,
    }
    check_workflow(workflow("train", str(CONFIGS / "train.json"), **override))
    assert (tmp_path / "ckpt" / "model.pt").is_file()
    evaluation = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path / "eval"),
        "handlers#0#load_path": str(tmp_path / "ckpt" / "model.pt"),
    }
    check_workflow(workflow("infer", [str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json")], **evaluation))
    assert (tmp_path / "eval" / "evaluation.csv").is_file()


def test_infer_config(dataset_dir, tmp_path):
    override = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path / "out"),
        "handlers#0#_disabled_": True,  # do not load weights, as the zoo's unit tests do
        "num_pairs": 2,
        "writer#write_qc": False,
    }
    check_workflow(workflow("infer", str(CONFIGS / "inference.json"), **override))
    assert len(list((tmp_path / "out").rglob("*_desc-enhanced_deltam.nii.gz"))) == 5


def test_deploy_app_version_follows_the_bundle():
    """The MONAI Deploy app packages this bundle's model: app.yaml, app.py and metadata.json agree."""
    version = metadata()["version"]
    manifest = (ROOT / "deploy" / "app.yaml").read_text()
    assert re.search(rf"^\s*version:\s*{re.escape(version)}\s*$", manifest, re.M), "deploy/app.yaml version"
    assert "from asl_enhance.version import __version__ as APP_VERSION" in (ROOT / "deploy" / "app.py").read_text()


def _summary_value(path: Path, dataset: str, k: str, method: str, column: str) -> float:
    import csv

    with open(path, newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if (r["dataset"], r["k"], r["method"]) == (dataset, k, method)]
    return float(row[column])


def test_eval_metrics_are_the_measured_ones():
    """metadata.json's eval_metrics (what the zoo shows) are the numbers of the model card's sources, so
    they cannot go stale as 0.5.0's did until 0.10.0."""
    bench = BUNDLE / "docs" / "benchmark" / "benchmark_summary.csv"
    fidelity = ROOT / "studies" / "fidelity" / "v0.11.0" / "fidelity_summary.csv"
    real = (fidelity, "fidelity_real")
    sources = {
        "real_ds000240_nmse_corrected_k2": (bench, "real", "network", "nmse_corrected"),
        "real_ds000240_nmse_corrected_k2_self_tuned_gaussian": (bench, "real", "gaussian_self", "nmse_corrected"),
        "real_ds000240_nmse_corrected_k2_oracle_width_gaussian": (bench, "real", "gaussian_oracle", "nmse_corrected"),
        "sim_test_nmse_vs_truth_k2": (bench, "test", "network", "nmse_truth"),
        "sim_test_nmse_k2_gaussian_baseline": (bench, "test", "gaussian", "nmse_truth"),
        "real_8scans_k2_nmse_corrected": (*real, "network", "nmse_corrected"),
        "real_8scans_k2_nmse_corrected_best_error_gaussian": (*real, "gauss_0.75", "nmse_corrected"),
        "real_8scans_lesions_k2_cr_hypo_r5": (*real, "network", "cr_hypo_r5"),
        "real_8scans_lesions_k2_cr_hypo_r2.5": (*real, "network", "cr_hypo_r2.5"),
        "real_8scans_lesions_k2_cr_hyper_r3.5": (*real, "network", "cr_hyper_r3.5"),
    }
    metrics = metadata()["eval_metrics"]
    assert set(metrics) == set(sources)
    for key, (path, dataset, method, column) in sources.items():
        assert metrics[key] == pytest.approx(_summary_value(path, dataset, "2", method, column), abs=6e-5), key
