"""The study scripts under studies/ still run on the current code: each test imports one by path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from asl_enhance.smoothing import gaussian_smooth
from helpers import load_study, phantom_series, write_series

import asl_bench.core as benchmark


def test_noise_level_sweep_shrinks_noise_and_twin_towards_the_truth():
    sweep = load_study("noise_level_sweep/noise_level_sweep.py")
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


def test_level_check_finds_no_level_prior(tmp_path):
    """level_check.py: scaling deltaM at fixed M0 leaves the level ratio of a network in the deltaM
    unit unchanged; a trained-looking (non-zero) output layer makes the network non-linear, so a
    level prior would show."""
    level_check = load_study("level_check/level_check.py")
    from monai.bundle import ConfigParser

    inference = benchmark.INFERENCE_CONFIG
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
    models = [benchmark.build_model(f"deltam={weights}:noise_bound=0", inference)]
    rows = level_check.check([series], models, [2], [0.25, 1.0, 4.0])
    levels = {(r["method"], r["factor"]): r["level"] for r in rows}
    assert levels[("deltam", 0.25)] == pytest.approx(levels[("deltam", 4.0)], rel=1e-4)


def test_score_checkpoints_names_only_checkpoints_a_run_has(tmp_path):
    """A run with a validation pick yields "best" and "last"; a run whose model.pt is its last epoch
    (keep_weights "last", never validated) yields only "last", not a second copy labelled "best"."""
    score_checkpoints = load_study("seed_study/score_checkpoints.py")
    from monai.bundle import ConfigParser

    inference = benchmark.INFERENCE_CONFIG
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


def test_anatomy_guidance_uses_the_controls_of_the_input_pairs_only(tmp_path):
    """anatomy_guidance.py: the control regressor of a k-pair input is the mean of exactly
    those pairs' control volumes (label-first storage and an included M0 handled by the reader); a
    real series (no truth) gets no oracle regressor sets."""
    anatomy_guidance = load_study("anatomy_guidance/anatomy_guidance.py")

    volumes, types, _ = phantom_series(num_pairs=4, label_first=True)
    controls = [i for i, t in enumerate(types) if t == "control"]
    for n, v in enumerate(controls):  # label-first: each control's label is the volume before it
        volumes[..., v] = 100.0 * (n + 1)
        volumes[..., v - 1] = 100.0 * (n + 1) - 1.0  # control - label stays positive (a realistic order)
    write_series(tmp_path / "sub-01" / "perf", "sub-01", volumes, types)
    series = benchmark.load_series(tmp_path, simulated=False, limit=None)[0]
    np.testing.assert_allclose(anatomy_guidance.mean_control(series, [1, 3]), 300.0)
    sets = anatomy_guidance.regressors(series, [1, 3], np.ones(volumes.shape[:3], bool))
    assert sorted(sets) == ["gaussian", "m0", "m0_control"]
    np.testing.assert_allclose(sets["m0_control"][1], 1.0)


def test_held_out_phantom_scores_noise_removal_and_invented_level(tmp_path):
    """held_out_phantom/phantom.py on a perfusion-free series (control and label differ by noise): the k-pair
    mean scores 1 and no shift, a blur removes noise (< 1), and a method that adds a level shows it as a shift."""
    phantom = load_study("held_out_phantom/phantom.py")
    volumes, types, _ = phantom_series((20, 18, 8), num_pairs=6, m0_volumes=0, seed=4)
    rng = np.random.default_rng(9)
    for c in [i for i, t in enumerate(types) if t == "control"]:
        volumes[..., c + 1] = volumes[..., c] + rng.normal(0, 5.0, volumes.shape[:3])
    write_series(tmp_path / "sub-01" / "perf", "sub-01", volumes, types)
    (series,) = benchmark.load_series(tmp_path, simulated=False, limit=None)
    rows = {r["method"]: r for r in phantom.score_group(series, [0, 1], [], None)}
    assert rows["mean"]["error"] == pytest.approx(1.0) and rows["mean"]["shift_pct"] == 0.0
    assert rows["gaussian 2.0"]["error"] < rows["gaussian 0.75"]["error"] < 1.0
    level = float(series.item["guide"][series.brain].mean())
    phantom_classical = phantom.classical
    phantom.classical = lambda voxel: {"plus": lambda prep: prep["input_mean"] + 0.001 * level}
    try:
        (plus,) = phantom.score_group(series, [0, 1], [], None)
    finally:
        phantom.classical = phantom_classical
    assert plus["shift_pct"] == pytest.approx(0.1, rel=1e-3) and plus["error"] > 1.0
    assert "| sub-01 | 2 | 1 | plus |" in phantom.summary([plus])


def test_band_energy_reads_one_on_noise_and_more_where_there_is_perfusion():
    """noise_gated_restore/band_energy.py: pairs of white noise give S near 1 in every band; a smooth
    perfusion map under the same noise stands far above its twin in the coarse band."""
    band_energy = load_study("noise_gated_restore/band_energy.py")
    rng = np.random.default_rng(0)
    shape = (40, 40, 12)
    head = np.ones(shape, bool)
    noise = rng.normal(0.0, 1.0, (2, *shape))
    assert all(0.9 < s < 1.1 for s in band_energy.energy_ratio(noise, head))
    perfusion = gaussian_smooth(rng.normal(0.0, 20.0, shape), (3.0, 3.0, 1.5))
    ratios = band_energy.energy_ratio(noise + perfusion[None], head)
    assert ratios[0] > 10 and ratios[0] > ratios[-1]


def test_quickstart_truth_scores_a_map_against_the_truth():
    """quickstart_truth.py: the truth itself scores NMSE 0 and ratios 1; a blur lowers the GM/WM ratio."""
    quickstart_truth = load_study("quickstart_truth/quickstart_truth.py")
    x = np.linspace(-1, 1, 24)[:, None, None] * np.ones((24, 24, 6))
    gm, wm = (x > 0.2).astype(float), (x < -0.2).astype(float)
    truth = 5.0 * gm + 1.0 * wm + 0.5
    assert quickstart_truth.scores(truth, truth, gm, wm) == (0.0, 1.0, 1.0)
    nmse, ratio, grey = quickstart_truth.scores(gaussian_smooth(truth, (3.0, 3.0, 0.0)), truth, gm, wm)
    assert nmse > 0 and ratio < 1 and grey < 1


def test_noharm_split_halves_are_disjoint_and_cover_the_pairs():
    noharm_split = load_study("fidelity/noharm_split.py")
    used, other = noharm_split.split_halves(7)
    assert used == [1, 3, 5] and other == [0, 2, 4, 6]


def test_single_pair_gate_averages_the_first_pairs_into_volumes():
    """The clean-input check gives the first pairs as 1 or 2 averaged volumes, the rest as the reference."""
    single_gate = load_study("single_pair_gate/single_gate.py")
    pairs = np.arange(6, dtype=np.float32)[:, None, None, None] * np.ones((6, 2, 2, 2), np.float32)
    series = benchmark.Series("x", {"pairs": pairs}, (1.0, 1.0, 1.0), np.ones((2, 2, 2), bool))
    merged, group = single_gate.as_volumes(series, 4, 2)
    assert group == [0, 1]
    np.testing.assert_allclose(merged.item["pairs"][:, 0, 0, 0], [0.5, 2.5, 4, 5])
    merged, group = single_gate.as_volumes(series, 4, 1)
    assert group == [0] and merged.item["pairs"][:, 0, 0, 0].tolist() == [1.5, 4, 5]
