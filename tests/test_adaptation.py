"""Per-scan adaptation: deterministic for a seed, never changes the loaded network or model.pt, skips
series with fewer than 2 pairs, and runs inside ``inference.json`` with ``--adapt_steps``."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from asl_enhance.adaptation import PerItemNetwork, ScanAdaptation, adapt_network, noise2noise_splits
from asl_enhance.transforms import network_input
from helpers import CONFIGS, bundle_run, phantom_series, write_series
from monai.bundle import ConfigParser

SHAPE = (20, 18, 8)


def _network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(3)
    return parser.get_parsed_content("network_def")


def _scan(num_pairs: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    guide = np.zeros(SHAPE, np.float32)
    guide[4:16, 4:14, 2:6] = 1000.0
    pairs = 0.01 * guide + rng.normal(0.0, 3.0, (num_pairs, *SHAPE)).astype(np.float32)
    return pairs, guide


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_splits_are_disjoint_and_cover_the_pairs():
    for used, rest in noise2noise_splits(4, 20, seed=0):
        assert len(used) >= 1 and len(rest) >= 1
        assert sorted([*used, *rest]) == [0, 1, 2, 3]


def test_adaptation_is_deterministic_and_leaves_the_network_untouched():
    net = _network()
    before = _state(net)
    pairs, guide = _scan()
    a = adapt_network(net, pairs, guide, steps=3, seed=7)
    b = adapt_network(net, pairs, guide, steps=3, seed=7)
    c = adapt_network(net, pairs, guide, steps=3, seed=8)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # the loaded network is never trained
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in before)
    assert any(not torch.equal(a.state_dict()[k], before[k]) for k in before)  # it did train
    assert any(not torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in before)  # the seed matters


def test_handler_swaps_per_item_and_restores():
    net = _network()
    pairs, guide = _scan(num_pairs=3)
    batch = {
        "pairs": torch.as_tensor(np.stack([pairs, pairs])),
        "guide": torch.as_tensor(np.stack([guide, guide])),
        "input_pairs": [json.dumps([0, 1, 2]), json.dumps([0])],  # item 2 has K = 1: not adapted
        "error": ["", ""],
    }
    engine = SimpleNamespace(state=SimpleNamespace(batch=batch), network=net)
    handler = ScanAdaptation(steps=2, seed=0)
    handler.adapt(engine)
    assert isinstance(engine.network, PerItemNetwork)
    assert engine.network.networks[1] is net and engine.network.networks[0] is not net
    image, _, _ = network_input(pairs.mean(axis=0), guide)
    x = torch.as_tensor(np.stack([image, image]))
    with torch.no_grad():
        out = engine.network(x)
        np.testing.assert_allclose(out[1].numpy(), net(x[1:])[0].numpy(), rtol=1e-5, atol=1e-6)
    handler.restore(engine)
    assert engine.network is net and len(handler.seconds) == 1


@pytest.mark.slow
def test_inference_with_adapt_steps_keeps_model_file(tmp_path):
    data = tmp_path / "data"
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3, seed=5)
    write_series(data / "sub-01" / "perf", "sub-01", volumes, types)
    weights = tmp_path / "model.pt"
    torch.save(_network().state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = bundle_run(
        "inference.json", "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"),
        "--handlers#0#load_path", str(weights), "--adapt_steps", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Adapted 1 inputs (2 steps each)" in result.stdout
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    sidecar = json.loads((tmp_path / "out" / "sub-01" / "perf" / "sub-01_desc-enhanced_deltam.json").read_text())
    assert sidecar["Settings"]["adapt_steps"] == 2
