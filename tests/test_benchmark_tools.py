"""Benchmark tools: the M0-guided filter, Gaussian tuning and the real-scan pair groups."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchmark  # noqa: E402
import classical_denoisers as cd  # noqa: E402
from asl_enhance.smoothing import gaussian_smooth  # noqa: E402


def test_guided_filter_preserves_constant_image():
    guide = np.random.default_rng(0).uniform(0.5, 1.5, (12, 10, 3))
    out = cd.guided_filter(np.full(guide.shape, 3.0), guide, radius=2, eps=0.01)
    np.testing.assert_allclose(out, 3.0, atol=1e-5)


def test_guided_filter_keeps_step_edge_of_guide():
    guide = np.zeros((16, 16, 2))
    guide[8:] = 1.0
    out = cd.guided_filter(2.0 * guide + 1.0, guide, radius=2, eps=1e-4)
    np.testing.assert_allclose(out, 2.0 * guide + 1.0, atol=0.01)
    assert out[7].max() < 1.05 and out[8].min() > 2.95  # no blur across the edge
    blurred = cd.gaussian(2.0 * guide + 1.0, guide, {"inplane": 1.0, "through": 0.0})
    assert blurred[7].max() > 1.2  # whereas a Gaussian of 1 voxel does blur it


def test_gaussian_tuning_picks_no_smoothing_for_noise_free_input():
    rng = np.random.default_rng(1)
    truth = gaussian_smooth(rng.normal(size=(16, 16, 6)), (1.0, 1.0, 0.5)) + 1.0
    mask = np.ones(truth.shape, bool)
    best, scores = cd.tune_gaussian([(truth, truth, truth, mask)], (0.0, 0.5, 1.0), (0.0, 1.0))
    assert best == {"inplane": 0.0, "through": 0.0}
    assert scores[0] == pytest.approx(0.0, abs=1e-10)
    noisy = truth + rng.normal(scale=2.0, size=truth.shape)
    best_noisy, _ = cd.tune_gaussian([(noisy, noisy, truth, mask)], (0.0, 0.5, 1.0), (0.0, 1.0))
    assert best_noisy != {"inplane": 0.0, "through": 0.0}


@pytest.mark.parametrize("num_pairs,k", [(50, 1), (50, 2), (50, 3), (50, 4), (8, 4), (5, 2), (4, 4)])
def test_real_scan_groups_are_disjoint_and_leave_a_reference(num_pairs, k):
    groups = benchmark.groups_for(num_pairs, k, benchmark.MAX_REAL_GROUPS)
    used = [i for g in groups for i in g]
    assert len(used) == len(set(used))
    assert all(len(g) == k and max(g) < num_pairs for g in groups)
    assert len(groups) == (0 if k >= num_pairs else min(benchmark.MAX_REAL_GROUPS, num_pairs // k))
    assert all(num_pairs - len(g) >= 1 for g in groups)


def test_denoisers_keep_shape_and_constant():
    volume = np.full((20, 18, 3), 2.0, np.float32)
    guide = np.ones_like(volume)
    for name, (fn, grid, _) in cd.DENOISERS.items():
        if name == "bm3d":
            continue  # slow start-up; covered by the benchmark's smoke run
        out = fn(volume, guide, grid()[0])
        assert out.shape == volume.shape
        np.testing.assert_allclose(out, 2.0, atol=1e-3)


def test_noise_level_sweep_shrinks_noise_and_twin_towards_the_truth():
    import noise_level_sweep as sweep
    from asl_enhance.transforms import noise_twin

    rng = np.random.default_rng(3)
    truth = rng.uniform(0.5, 1.5, (10, 9, 4)).astype(np.float32)
    pairs = truth + rng.normal(0, 0.5, (2, *truth.shape)).astype(np.float32)
    prep = {
        "input_mean": pairs.mean(0),
        "input_twin": noise_twin(pairs),
        "guide": np.full(truth.shape, 100.0),
        "truth": truth,
    }
    half = sweep.shrunk(prep, 0.5)
    np.testing.assert_allclose(half["input_mean"] - truth, 0.5 * (prep["input_mean"] - truth), atol=1e-6)
    np.testing.assert_allclose(half["input_twin"], 0.5 * prep["input_twin"], atol=1e-6)
    np.testing.assert_allclose(half["image"][2], half["input_twin"] / half["scale"], rtol=1e-5)
    clean = sweep.shrunk(prep, 0.0)
    np.testing.assert_allclose(clean["input_mean"], truth, atol=1e-6)
    masks = {"GM": truth > 1.0, "WM": truth <= 1.0}
    assert sweep.tissue_bias(truth, truth, masks) == {"GM": 0.0, "WM": 0.0}
    assert sweep.tissue_bias(1.1 * truth, truth, masks)["GM"] == pytest.approx(10.0, rel=1e-4)


def test_model_spec_merges_several_configs(tmp_path):
    """NAME=weights:base.json:overlay.json builds the overlay's backbone on the base config."""
    from asl_enhance.networks import PaddedBackbone
    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[1]
    inference = root / "asl_bundle" / "configs" / "inference.json"
    overlay = root / "scripts" / "alternatives" / "dynunet.json"
    parser = ConfigParser()
    parser.read_config([str(inference), str(overlay)])
    weights = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), weights)
    model = benchmark.build_model(f"dyn={weights}:{inference}:{overlay}:noise_bound=0", inference)
    assert isinstance(model.net.backbone, PaddedBackbone)
    assert model.net.noise_bound == 0.0 and model.use_noise_twin


def test_level_check_separates_level_keeping_from_level_prior(tmp_path):
    """scripts/level_check.py: scaling deltaM at fixed M0 leaves the level ratio of a network in the
    deltaM unit unchanged, while the legacy unit (percent of M0) lets it drift; a trained-looking
    (non-zero) output layer makes the network non-linear so the difference shows."""
    import level_check
    from monai.bundle import ConfigParser

    inference = Path(__file__).resolve().parents[1] / "asl_bundle" / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(inference))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    for param in net.parameters():
        param.data.normal_(0.0, 0.3)
    weights = tmp_path / "model.pt"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(3)
    shape = (16, 14, 6)
    truth = gaussian_smooth(rng.uniform(0.0, 2.0, shape), (1.5, 1.5, 1.0)).astype(np.float32)
    pairs = (truth + rng.normal(0.0, 0.5, (5, *shape))).astype(np.float32)
    item = {"pairs": pairs, "guide": np.full(shape, 300.0, np.float32), "asl": "phantom"}
    series = benchmark.Series("phantom", item, (3.0, 3.0, 5.0), np.ones(shape, bool), truth=truth)
    models = [
        benchmark.build_model(f"{n}={weights}:noise_bound=0,input_level={n}", inference) for n in ("deltam", "guide")
    ]
    rows = level_check.check([series], models, [2], [0.25, 1.0, 4.0])
    levels = {(r["method"], r["factor"]): r["level"] for r in rows}
    assert levels[("deltam", 0.25)] == pytest.approx(levels[("deltam", 4.0)], rel=1e-4)
    assert abs(levels[("guide", 0.25)] - levels[("guide", 4.0)]) > 1e-3


def test_score_checkpoints_names_only_checkpoints_a_run_has(tmp_path):
    """A run with a validation pick yields "best" and "last"; a run whose model.pt is its last epoch
    (keep_weights "last", never validated) yields only "last", not a second copy labelled "best"."""
    import score_checkpoints
    from monai.bundle import ConfigParser

    inference = Path(__file__).resolve().parents[1] / "asl_bundle" / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(inference))
    torch.manual_seed(0)
    last_net, pick_net = parser.get_parsed_content("network_def"), parser.get_parsed_content("network_def")
    for run in ("validated", "unvalidated"):
        (tmp_path / run).mkdir()
        torch.save({"model": last_net.state_dict(), "epoch": 3}, tmp_path / run / "checkpoint.pt")
        torch.save(last_net.state_dict(), tmp_path / run / "model.pt")
    torch.save(pick_net.state_dict(), tmp_path / "validated" / "model_best_val.pt")
    runs = ("validated", "unvalidated")
    names = {run: [m.name for m in score_checkpoints.checkpoints(str(tmp_path / run))] for run in runs}
    assert names == {"validated": ["validated_best", "validated_last"], "unvalidated": ["unvalidated_last"]}


def test_local_regression_keeps_edges_of_its_regressors():
    """One constant regressor gives the Gaussian blur; two tissue maps with constant levels are
    recovered exactly (the edge between them survives a blur far wider than the structure)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    shape = (20, 18, 6)
    noisy = rng.normal(size=shape).astype(np.float32)
    blur = cd.local_regression(noisy, [np.ones(shape)], (1.5, 1.5, 1.0), ridge=0.0)
    np.testing.assert_allclose(blur, ndimage.gaussian_filter(noisy, (1.5, 1.5, 1.0), mode="nearest"), atol=1e-4)
    gm = np.zeros(shape)
    gm[:, :9] = 1.0
    gm[:, 9] = 0.4
    wm = 1.0 - gm
    tissue = (60.0 * gm + 20.0 * wm).astype(np.float32)
    fit = cd.local_regression(tissue, [gm, wm], (4.0, 4.0, 2.0), ridge=1e-6)
    np.testing.assert_allclose(fit, tissue, rtol=1e-3)
    assert np.abs(gaussian_smooth(tissue, (4.0, 4.0, 2.0)) - tissue).max() > 5.0


def test_anatomy_guidance_uses_the_controls_of_the_input_pairs_only(tmp_path):
    """scripts/anatomy_guidance.py: the control regressor of a k-pair input is the mean of exactly
    those pairs' control volumes (label-first storage and an included M0 handled by the reader); a
    real series (no truth) gets no oracle regressor sets."""
    import anatomy_guidance
    from helpers import phantom_series, write_series

    volumes, types, _ = phantom_series(num_pairs=4, label_first=True)
    controls = [i for i, t in enumerate(types) if t == "control"]
    for n, v in enumerate(controls):
        volumes[..., v] = 100.0 * (n + 1)
    write_series(tmp_path / "sub-01" / "perf", "sub-01", volumes, types)
    series = benchmark.load_series(tmp_path, simulated=False, limit=None)[0]
    np.testing.assert_allclose(anatomy_guidance.mean_control(series, [1, 3]), 300.0)
    sets = anatomy_guidance.regressors(series, [1, 3], np.ones(volumes.shape[:3], bool))
    assert sorted(sets) == ["gaussian", "m0", "m0_control"]
    np.testing.assert_allclose(sets["m0_control"][1], 1.0)
