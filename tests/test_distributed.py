"""multi_gpu_train.json: the zoo-style DDP overlay on train.json, run by ``torchrun`` with 2 processes on CPU
(gloo). Checks that it trains, that only rank 0 saves and logs, and that the saved weights load into the
plain (un-wrapped) inference network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BUNDLE, CONFIGS, write_phantom_dataset
from monai.bundle import ConfigParser


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    """Six tiny series: 4 for training (2 per rank), 2 for validation (1 per rank)."""
    root = tmp_path_factory.mktemp("ddp_data")
    write_phantom_dataset(root, 6, (20, 18, 8), num_pairs=4, first_seed=10)
    return root


@pytest.mark.parametrize("rank", [0, 1])
def test_side_effect_handlers_follow_the_rank(rank, monkeypatch, ddp_data, tmp_path):
    """Ranks > 0 write nothing: stats, TensorBoard, progress bar, checkpoint saving and validation
    outputs are disabled by rank (no handler addressed by list position); training still runs.
    (No process group here: the plain network and default samplers stand in for DDP's.)"""
    monkeypatch.setenv("RANK", str(rank))
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    local = {"network": "@network_def", "train#dataloader#sampler": None, "validate#dataloader#sampler": None}
    parser.update({**local, "dataset_dir": str(ddp_data), "output_dir": str(tmp_path), "cache_rate": 0.0})
    train = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    validate = parser.get_parsed_content("validate#evaluator#val_handlers")
    validate = [type(h).__name__ for h in validate or []]
    checkpoint = next(
        h for h in parser.get_parsed_content("train#handlers") if type(h).__name__ == "ResumableCheckpoint"
    )
    assert checkpoint.enabled == (rank == 0)
    assert ("TensorBoardStatsHandler" in train) == (rank == 0) and ("ProgressBar" in train) == (rank == 0)
    assert validate == (["StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver"] if rank == 0 else [])
    assert "LrScheduleHandler" in train and "ValidationHandler" in train
    assert parser["train#dataloader#shuffle"] is False


@pytest.mark.slow
def test_torchrun_two_processes_cpu(ddp_data, tmp_path):
    ckpt, runs = tmp_path / "ckpt", tmp_path / "runs"
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "--config_file", configs, "--meta_file", str(CONFIGS / "metadata.json"),
        "--bundle_root", str(BUNDLE), "--dataset_dir", str(ddp_data), "--ckpt_dir", str(ckpt),
        "--output_dir", str(runs), "--max_epochs", "1", "--val_interval", "1", "--val_fraction", "0.34",
        "--patch_size", "[16,16,4]", "--batch_size", "2", "--samples_per_series", "2", "--cache_rate", "0",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE), env.get("PYTHONPATH", "")])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("SupervisedTrainer - INFO - Epoch[1] Complete") == 1, log[-4000:]  # rank 1 logs warnings only
    assert "val_nmse" in log
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint.pt").is_file()
    assert {p.name for p in ckpt.iterdir()} <= {"model.pt", "checkpoint.pt", "model_best_val.pt"}
    # events.out.tfevents.<time>.<host>.<pid>.<n>: one writing process (the host name may hold dots)
    writers = {p.name.split(".")[-2] for p in runs.glob("events.out.tfevents.*")}
    assert len(writers) == 1, writers  # TensorBoard: rank 0 only
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    net = parser.get_parsed_content("network_def")
    for name in ("model.pt", "checkpoint.pt"):  # no "module." prefix: DDP is unwrapped when saving
        state = torch.load(ckpt / name, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state))
