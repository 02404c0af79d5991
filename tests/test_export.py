"""scripts/export_model.sh: ``monai.bundle ckpt_export`` gives a TorchScript model.ts that carries the bundle's
metadata.json and inference.json and computes what the eager network computes (within 1e-5). Exports go to
temporary folders; weights are a random network unless the trained models/model.pt is present."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BUNDLE, CONFIGS, INPUT_CHANNELS, ROOT
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata

SCRIPT = ROOT / "scripts" / "export_model.sh"
SHIPPED = BUNDLE / "models" / "model.pt"


def eager_network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    return parser.get_parsed_content("network_def")


def random_weights(path: Path) -> Path:
    """A network whose every weight is non-zero (the fresh one's last layer is zero: output = base)."""
    torch.manual_seed(3)
    net = eager_network()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    torch.save(net.state_dict(), path)
    return path


def export(ckpt: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    cmd = ["bash", str(SCRIPT), "--ckpt", str(ckpt), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def eager_with(ckpt: Path) -> torch.nn.Module:
    net = eager_network()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state))
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("export")
    ckpt = random_weights(folder / "model.pt")
    result = export(ckpt, folder / "model.ts")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ckpt, folder / "model.ts"


@pytest.mark.slow
def test_model_ts_carries_metadata_and_inference_config(exported):
    _, ts = exported
    net, meta, extra = load_net_with_metadata(str(ts), map_location="cpu", more_extra_files=["inference.json"])
    assert isinstance(net, torch.jit.ScriptModule)
    assert meta["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == INPUT_CHANNELS
    assert json.loads(extra["inference.json"]) == json.loads((CONFIGS / "inference.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, INPUT_CHANNELS, 32, 32, 8), (2, INPUT_CHANNELS, 23, 17, 5)])
def test_torchscript_matches_eager(exported, shape):
    ckpt, ts = exported
    scripted = torch.jit.load(str(ts), map_location="cpu").eval()
    x = torch.rand(shape)
    x[:, 0] *= 5.0  # deltaM in percent of the guide level, the other channels near unit level
    with torch.no_grad():
        want, got = eager_with(ckpt)(x), scripted(x)
    assert got.shape == (shape[0], 1, *shape[2:])
    assert (want - x[:, :1]).abs().max() > 1e-3  # the backbone contributes: not a trivial identity check
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason="asl_bundle/models/model.pt not trained yet")
def test_shipped_weights_export(tmp_path):
    result = export(SHIPPED, tmp_path / "model.ts")
    assert result.returncode == 0, result.stderr[-3000:]
    scripted = torch.jit.load(str(tmp_path / "model.ts"), map_location="cpu")
    x = torch.rand(1, INPUT_CHANNELS, 40, 36, 10)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager_with(SHIPPED)(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = export(tmp_path / "absent.pt", tmp_path / "model.ts")
    assert result.returncode == 1 and "no checkpoint" in result.stderr


ONNX_READY = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


@pytest.mark.slow
@pytest.mark.skipif(not ONNX_READY, reason="onnx, onnxscript and onnxruntime are not installed (optional)")
def test_onnx_export_matches(exported, tmp_path):
    ckpt, _ = exported
    result = export(ckpt, tmp_path / "model.ts", "--onnx")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ONNX Runtime vs TorchScript" in result.stdout
    assert (tmp_path / "model.onnx").is_file()
