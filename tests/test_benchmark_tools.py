"""Benchmark library (asl_bench): the M0-guided filter, Gaussian tuning, real-scan pair groups, model specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from asl_enhance.smoothing import gaussian_smooth

import asl_bench.classical as cd
import asl_bench.core as benchmark


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


def test_model_spec_applies_overrides_on_the_inference_config(tmp_path):
    """NAME=weights:key=value builds the shipped network_def with the override (the layout too)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(benchmark.INFERENCE_CONFIG))
    weights = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), weights)
    model = benchmark.build_model(f"net={weights}:noise_bound=0", benchmark.INFERENCE_CONFIG)
    assert model.net.noise_bound == 0.0 and model.layout.use_noise_twin
    with pytest.raises(RuntimeError):  # a layout without the twin is a different first layer
        benchmark.build_model(f"net={weights}:noise_bound=0,use_noise_twin=false", benchmark.INFERENCE_CONFIG)
