"""Experiment tracking: ``--tracking mlflow`` (MONAI's MLflow handlers, a local SQLite store under output_dir)
records parameters, metrics and the executed config; ``--tracking configs/tracking_mlflow.json`` adds the
hyper-parameters and the trained model.pt. TensorBoard event files are still written. Skipped without mlflow."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BUNDLE, CONFIGS, write_phantom_dataset

#: every test here starts a process (monai.bundle run, the deploy app, mlflow training)
pytestmark = pytest.mark.slow

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed (test extra)")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("track_data")
    write_phantom_dataset(root, 4, (20, 18, 8), num_pairs=4, first_seed=40)
    return root


def train(data: Path, out: Path, tracking: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"),
           "--meta_file", str(CONFIGS / "metadata.json"), "--bundle_root", str(BUNDLE), "--tracking", tracking,
           "--dataset_dir", str(data), "--ckpt_dir", str(out / "ckpt"), "--output_dir", str(out / "runs"),
           "--max_epochs", "2", "--val_interval", "1", "--patch_size", "[16,16,4]", "--batch_size", "2",
           "--samples_per_series", "2", "--cache_rate", "0",
           # with output_dir given as a plain path, MONAI's default config artifact name is not a path: name it
           "--save_execute_config", str(out / "runs" / "config_run.json")]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out, env=env)


def runs_in(out: Path) -> list:
    import mlflow
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(out / "runs" / "mlruns.db")))
    experiments = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in experiments])


@pytest.mark.parametrize("tracking", ["mlflow", "tracking_mlflow.json"])
def test_mlflow_records_params_metrics_artifacts(data, tmp_path, tracking):
    setting = tracking if tracking == "mlflow" else str(CONFIGS / tracking)
    result = train(data, tmp_path, setting)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, runs = runs_in(tmp_path)
    run = next(r for r in runs if "train_loss" in r.data.metrics)
    assert "max_epochs" in run.data.params
    assert "val_nmse" in {m for r in runs for m in r.data.metrics}
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config_run.json" in artifacts, artifacts
    if tracking != "mlflow":
        assert run.data.params["learning_rate"] == "0.001"
        assert "model.pt" in artifacts
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))  # TensorBoard logs stay available
