"""Planted perfusion lesions for training: every pair keeps its noise, the twin is unchanged, the
truth follows the gain, shapes are round in mm, and nothing changes when the draw says no."""

from __future__ import annotations

import numpy as np
import pytest
from asl_enhance.augmentation import RandGuideDropoutd, RandPerfusionLesionsd, ellipsoid_weight
from asl_enhance.items import voxel_sizes
from asl_enhance.transforms import noise_twin

SHAPE = (32, 30, 10)


def _item(seed: int = 0, with_truth: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    truth = np.zeros(SHAPE, np.float32)
    truth[6:26, 5:25, 2:8] = 1.0 + 0.3 * rng.random((20, 20, 6))
    pairs = (truth[None] + 0.5 * rng.standard_normal((4, *SHAPE))).astype(np.float32)
    item = {"pairs": pairs, "affine": np.diag([2.0, 2.0, 4.0, 1.0])}
    if with_truth:
        item["truth"] = truth
    return item


def _planted(seed: int = 1, **kwargs) -> tuple[dict, dict, RandPerfusionLesionsd]:
    item = _item()
    transform = RandPerfusionLesionsd(prob=1.0, **kwargs)
    transform.set_random_state(seed)
    return item, transform(item), transform


def test_each_pair_keeps_its_noise_and_truth_follows_the_gain():
    item, out, transform = _planted()
    assert transform._lesions, "prob 1 must plant at least one lesion"
    noise_before = item["pairs"] - item["truth"][None]
    noise_after = out["pairs"] - out["truth"][None]
    np.testing.assert_allclose(noise_after, noise_before, atol=1e-5)
    np.testing.assert_allclose(noise_twin(out["pairs"]), noise_twin(item["pairs"]), atol=1e-5)
    assert not np.allclose(out["truth"], item["truth"])


def test_gains_stay_in_their_ranges_and_centres_have_perfusion():
    kinds = set()
    for seed in range(20):
        item, out, transform = _planted(seed, max_lesions=1, hypo_range=(0.1, 0.5), hyper_range=(1.5, 2.0))
        (lesion,) = transform._lesions
        assert 0.1 <= lesion["gain"] <= 0.5 or 1.5 <= lesion["gain"] <= 2.0
        assert item["truth"][tuple(lesion["centre"])] > 0
        ratio = out["truth"][item["truth"] > 0] / item["truth"][item["truth"] > 0]
        low, high = sorted((1.0, lesion["gain"]))
        assert low - 1e-5 <= ratio.min() and ratio.max() <= high + 1e-5
        kinds.add(lesion["gain"] < 1)
    assert kinds == {True, False}, "both hypo- and hyperperfusion are drawn"


def test_a_hypoperfused_lesion_lowers_its_centre():
    item, out, transform = _planted(seed=4, max_lesions=1, hypo_range=(0.2, 0.2), hyper_range=(0.2, 0.2))
    centre = tuple(transform._lesions[0]["centre"])
    assert out["truth"][centre] == pytest.approx(0.2 * item["truth"][centre], rel=1e-5)


def test_without_truth_the_all_pair_mean_is_the_base():
    item = _item(with_truth=False)
    transform = RandPerfusionLesionsd(prob=1.0)
    transform.set_random_state(2)
    out = transform(item)
    np.testing.assert_allclose(noise_twin(out["pairs"]), noise_twin(item["pairs"]), atol=1e-5)
    assert not np.allclose(out["pairs"], item["pairs"])


def test_prob_zero_and_failed_items_pass_unchanged():
    item = _item()
    out = RandPerfusionLesionsd(prob=0.0)(item)
    np.testing.assert_array_equal(out["pairs"], item["pairs"])
    failed = dict(item, error="bad series")
    assert RandPerfusionLesionsd(prob=1.0)(failed)["pairs"] is item["pairs"]


def test_same_seed_same_lesions():
    _, first, _ = _planted(seed=7)
    _, second, _ = _planted(seed=7)
    np.testing.assert_array_equal(first["pairs"], second["pairs"])


def test_ellipsoid_is_round_in_mm():
    units = np.asarray(voxel_sizes(np.diag([2.0, 2.0, 4.0, 1.0]))) / 2.0
    weight = ellipsoid_weight((41, 41, 21), (20, 20, 10), (6.0, 6.0, 6.0), 0.0, 1.0, units)
    assert weight[20, 20, 10] == 1.0
    in_plane = np.count_nonzero(weight[:, 20, 10] >= 0.5)
    through = np.count_nonzero(weight[20, 20, :] >= 0.5)
    assert in_plane == 13 and through == 7  # 6 voxels of 2 mm each way; 3 slices of 4 mm


def test_guide_dropout_gives_what_a_deltam_only_series_gives():
    """A dropped guide is the loader's zeros and source "none"; kept otherwise, about prob of the time."""
    item = {"guide": np.full(SHAPE, 100.0, np.float32), "guide_source": "m0"}
    transform = RandGuideDropoutd(prob=0.3)
    transform.set_random_state(0)
    outs = [transform(item) for _ in range(400)]
    dropped = [o for o in outs if o["guide_source"] == "none"]
    assert 0.22 < len(dropped) / len(outs) < 0.38
    assert all(not o["guide"].any() and o["guide"].shape == SHAPE for o in dropped)
    assert all(o["guide"] is item["guide"] for o in outs if o["guide_source"] == "m0")
    assert RandGuideDropoutd(prob=1.0)(dict(item, error="x"))["guide_source"] == "m0"
