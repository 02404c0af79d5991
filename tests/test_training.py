"""Training faults: a broken series is skipped and named, a run killed mid-epoch resumes from its last
checkpoint, and the same seed on the CPU gives the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import bundle_run, phantom_series, write_phantom_dataset, write_series

#: every test here starts a process (monai.bundle run, the deploy app, mlflow training)
pytestmark = pytest.mark.slow

SHAPE = (20, 18, 8)
TINY = ("--patch_size", "[16,16,4]", "--batch_size", "2", "--samples_per_series", "2", "--val_interval", "1")


@pytest.fixture(scope="module")
def data_with_broken_series(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_broken")
    write_phantom_dataset(root, 4, SHAPE, num_pairs=5, first_seed=0, alternate_order=True)
    broken = root / "sub-99" / "perf"
    volumes, types, _ = phantom_series(SHAPE, num_pairs=5, seed=9)
    write_series(broken, "sub-99", volumes, types[:-3])  # aslcontext shorter than the 4D volume
    return root


def _train(data: Path, ckpt: Path, *extra: str):
    return bundle_run(
        "train.json", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(ckpt / "runs"),
        *TINY, *extra,
    )  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_broken_series_is_skipped_and_named(data_with_broken_series, tmp_path):
    result = _train(data_with_broken_series, tmp_path / "ckpt", "--max_epochs", "1")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "skipped series for training" in log and "sub-99_aslcontext.tsv" in log
    assert (tmp_path / "ckpt" / "model.pt").is_file()


def test_same_seed_gives_same_weights(data_with_broken_series, tmp_path):
    for run in ("a", "b"):
        assert _train(data_with_broken_series, tmp_path / run, "--max_epochs", "1", "--seed", "3").returncode == 0
    a, b = _weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "b" / "checkpoint.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_from_last_checkpoint(data_with_broken_series, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert _train(data_with_broken_series, ckpt, "--max_epochs", "1").returncode == 0
    first = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=True)
    per_epoch = first["trainer"]["epoch_length"]
    assert first["trainer"]["iteration"] == per_epoch and first["trainer"]["max_epochs"] == 1
    # the documented override: same command, more epochs, --resume true
    result = _train(data_with_broken_series, ckpt, "--max_epochs", "3", "--resume", "true")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Resumed from" in log and "after epoch 1 of 3" in log
    final = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 3 * per_epoch and final["trainer"]["max_epochs"] == 3
    assert "state" in final["optimizer"] and final["lr_scheduler"]["last_epoch"] == 3


def test_resume_without_checkpoint_fails_clearly(data_with_broken_series, tmp_path):
    result = _train(data_with_broken_series, tmp_path / "empty", "--max_epochs", "1", "--resume", "true")
    assert result.returncode != 0
    assert "no checkpoint to resume from" in result.stdout + result.stderr
