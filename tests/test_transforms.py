"""Transform chain: first-k selection, targets, normalisation, and scale equivariance through a
random-initialised network (scaling the series and M0 by c scales every output by c)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from asl_enhance.bids import ASLInputError, find_asl_series
from asl_enhance.layout import InputLayout
from asl_enhance.networks import ScaleMixingEnhancer
from asl_enhance.transforms import (
    LoadASLSeriesd,
    NormalizeASLd,
    RandNoiseLeveld,
    RestoreScaled,
    SelectPairsd,
    deltam_level,
    guide_scale,
    network_input,
    noise_twin,
)
from helpers import phantom_series, write_series
from monai.transforms import Compose

SHAPE = (16, 14, 6)


def _chain(num_pairs=None, k=None, target="none", use_guide=True, mode="first", use_noise_twin=False):
    return Compose(
        [
            LoadASLSeriesd("asl", num_pairs=num_pairs),
            SelectPairsd("pairs", num_input_pairs=k, mode=mode, target=target),
            NormalizeASLd(layout=InputLayout(use_guide, use_noise_twin)),
        ]
    )


def _write_phantom(folder, stem="sub-01", scale=1.0, guide="included", seed=0, num_pairs=5, perfusion=1.0):
    """``scale`` multiplies every volume; ``perfusion`` only each control - label difference."""
    volumes, types, truth = phantom_series(SHAPE, num_pairs=num_pairs, seed=seed, m0_volumes=1)
    volumes = volumes * scale
    for i in [i for i, t in enumerate(types) if t == "label"]:  # each label follows its control
        volumes[..., i] = volumes[..., i - 1] - perfusion * (volumes[..., i - 1] - volumes[..., i])
    m0 = None
    if guide in ("control", "separate", "none"):
        m0 = volumes[..., 0] if guide == "separate" else None
        volumes, types = volumes[..., 1:], types[1:]
    if guide == "none":  # deltam volumes only: no anatomy at all
        volumes = volumes[..., 0::2] - volumes[..., 1::2]
        types = ["deltam"] * volumes.shape[-1]
    write_series(folder, stem, volumes, types, m0=m0)
    (item,) = [i for i in find_asl_series(folder) if i["stem"] == stem]
    return item, volumes, types


def test_first_k_input_mean_and_other_target(tmp_path):
    item, volumes, _ = _write_phantom(tmp_path)
    d = _chain(k=2, target="other")(item)
    pairs = volumes[..., 1::2] - volumes[..., 2::2]  # m0 first, then control/label
    np.testing.assert_allclose(d["input_mean"], pairs[..., :2].mean(axis=-1), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(d["other_mean"], pairs[..., 2:].mean(axis=-1), rtol=1e-5, atol=1e-3)
    assert json.loads(d["input_pairs"]) == [0, 1] and d["num_pairs_used"] == 2
    assert d["image"].shape == (2, *SHAPE) and d["image"].dtype == np.float32
    assert d["label"].shape == (1, *SHAPE) and d["mask"].shape == (1, *SHAPE)
    np.testing.assert_allclose(d["image"][0] * d["scale"], d["input_mean"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(d["label"][0] * d["scale"], d["other_mean"], rtol=1e-5, atol=1e-3)
    assert d["guide_source"] == "m0" and d["error"] == ""


def test_all_target_and_no_guide_channel(tmp_path):
    item, volumes, _ = _write_phantom(tmp_path, guide="control")
    d = _chain(k=1, target="all", use_guide=False)(item)
    pairs = volumes[..., 0::2] - volumes[..., 1::2]
    np.testing.assert_allclose(d["target"], pairs.mean(axis=-1), rtol=1e-5, atol=1e-3)
    assert d["image"].shape == (1, *SHAPE) and d["guide_source"] == "control"


def test_random_mode_draws_within_range(tmp_path):
    item, _, _ = _write_phantom(tmp_path, num_pairs=6)
    select = SelectPairsd("pairs", num_input_pairs=[1, 4], mode="random", target="other")
    select.set_random_state(0)
    loaded = LoadASLSeriesd()(item)
    ks = set()
    for _ in range(30):
        d = select(loaded)
        used = json.loads(d["input_pairs"])
        ks.add(len(used))
        assert used == sorted(used) and 1 <= len(used) <= 4
        assert d["other_mean"].shape == SHAPE
    assert ks == {1, 2, 3, 4}


def test_select_errors(tmp_path):
    item, _, _ = _write_phantom(tmp_path, num_pairs=2)
    loaded = LoadASLSeriesd()(item)
    with pytest.raises(ASLInputError, match="needs 3 input pairs"):
        SelectPairsd(num_input_pairs=3)(loaded)
    with pytest.raises(ASLInputError, match="needs more than 2 pairs"):
        SelectPairsd(num_input_pairs=2, target="other")(loaded)
    with pytest.raises(ValueError):
        SelectPairsd(mode="best")
    with pytest.raises(ValueError):
        LoadASLSeriesd(on_error="ignore")


def test_guide_scale_is_homogeneous():
    rng = np.random.default_rng(0)
    guide = rng.uniform(0, 1000, SHAPE)
    level, mask = guide_scale(guide, guide)
    level2, mask2 = guide_scale(guide * 3.5, guide)
    assert level2 == pytest.approx(3.5 * level, rel=1e-6)
    np.testing.assert_array_equal(mask, mask2)
    assert guide_scale(np.zeros(SHAPE), np.zeros(SHAPE))[0] == 1.0


@pytest.mark.parametrize("c", [0.2, 3.0])
def test_network_input_ignores_the_deltam_to_m0_ratio(c):
    """Scaling deltaM (and its noise) with M0 fixed, as a scanner's M0 scaling or a subject's global
    CBF does, must leave the network's input unchanged: only ``scale`` follows deltaM."""
    rng = np.random.default_rng(1)
    guide = rng.uniform(500, 1000, SHAPE)
    deltam = rng.normal(5.0, 3.0, SHAPE)
    twin = rng.normal(0.0, 3.0, SHAPE)
    image, scale, mask = network_input(deltam, guide, InputLayout(), twin=twin)
    image_c, scale_c, mask_c = network_input(deltam * c, guide, InputLayout(), twin=twin * c)
    np.testing.assert_allclose(image_c, image, rtol=1e-5, atol=1e-6)
    assert scale_c == pytest.approx(c * scale, rel=1e-6)
    np.testing.assert_array_equal(mask, mask_c)
    assert image[0][mask].mean() == pytest.approx(0.3, rel=1e-4)  # DELTAM_HEAD_LEVEL


def test_deltam_level_stays_positive():
    mask = np.ones(SHAPE, bool)
    noise = np.random.default_rng(2).normal(0.0, 2.0, SHAPE)
    assert deltam_level(noise - noise.mean(), mask) == pytest.approx(
        0.05 * np.sqrt(np.mean((noise - noise.mean()) ** 2))
    )
    assert deltam_level(-np.abs(noise), mask) > 0  # inverted label order: still a finite positive unit
    assert deltam_level(np.zeros(SHAPE), mask) == 1.0


def test_item_sets_its_own_k(tmp_path):
    """``num_pairs_key``: one validation list scores each series at several k (first k pairs)."""
    item, _, _ = _write_phantom(tmp_path, num_pairs=5)
    loaded = LoadASLSeriesd()(item)
    select = SelectPairsd(num_input_pairs=2, target="other", num_pairs_key="val_num_pairs")
    for k in (1, 3, 4):
        d = select(dict(loaded, val_num_pairs=k))
        assert json.loads(d["input_pairs"]) == list(range(k)) and d["num_pairs_used"] == k
    assert select(loaded)["num_pairs_used"] == 2  # no field: the transform's own k
    assert select(dict(loaded, val_num_pairs=5))["num_pairs_used"] == 4  # capped: one pair stays the target
    with pytest.raises(ASLInputError, match="needs more than 5 pairs"):
        SelectPairsd(num_input_pairs=5, target="other")(loaded)  # an explicit k is never capped


@pytest.mark.parametrize("guide", ["included", "separate", "control", "none"])
@pytest.mark.parametrize(
    "scaled, c", [("every volume", 7.25), ("every volume", 0.013), ("perfusion only", 4.0), ("perfusion only", 0.25)]
)
def test_scale_equivariance_through_network(tmp_path, guide, c, scaled):
    """Enhanced deltaM scales with the input, whether a scanner's units change (every volume) or
    only the perfusion does at fixed M0 (global CBF, labelling efficiency): no level prior. (A
    perfusion-only factor of 0.013 would lose deltaM to float32 rounding of control - label.)"""
    torch.manual_seed(0)
    layout = InputLayout(use_guide=guide != "none", use_noise_twin=True)
    channels = layout.num_channels
    net = ScaleMixingEnhancer(layout, features=8).eval()
    for param in net.parameters():  # trained-like weights: a zero-initialised head would hide a level prior
        torch.nn.init.normal_(param, std=0.1)
    post = RestoreScaled("pred")
    outputs = []
    for scale, folder in ((1.0, tmp_path / "a"), (c, tmp_path / "b")):
        if scaled == "every volume":
            item, _, _ = _write_phantom(folder, scale=scale, guide=guide)
        else:
            item, _, _ = _write_phantom(folder, perfusion=scale, guide=guide)
        d = _chain(k=2, use_guide=guide != "none", use_noise_twin=True)(item)
        assert d["image"].shape[0] == channels
        with torch.no_grad():
            pred = net(torch.as_tensor(d["image"])[None])[0].numpy()
        d["pred"] = pred
        outputs.append((d, pred, post(d)["pred"]))
    (d1, raw1, out1), (dc, rawc, outc) = outputs
    assert float(dc["scale"]) == pytest.approx(c * float(d1["scale"]), rel=1e-4)
    np.testing.assert_allclose(dc["image"], d1["image"], rtol=1e-4, atol=1e-4)
    if scaled == "every volume" or guide != "none":  # without any guide the mask comes from deltaM
        np.testing.assert_array_equal(dc["mask"], d1["mask"])
    # network output (normalised units) is unchanged, so output x scale scales by c
    np.testing.assert_allclose(rawc, raw1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rawc * float(dc["scale"]), c * raw1 * float(d1["scale"]), rtol=1e-4, atol=1e-4 * c)
    tol = 1e-4 * c * np.abs(out1).max()
    np.testing.assert_allclose(outc, c * out1, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(dc["input_mean"], c * d1["input_mean"], rtol=1e-4, atol=tol)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_noise_twin_cancels_perfusion_and_matches_the_mean_noise(k):
    """Same map in every pair -> twin 0; iid noise -> twin variance = the k-pair mean's noise variance."""
    rng = np.random.default_rng(k)
    perfusion = rng.uniform(0, 5, SHAPE)
    np.testing.assert_allclose(noise_twin(np.repeat(perfusion[None], k, axis=0)), 0, atol=1e-5)
    noise = rng.normal(0, 2.0, (4000, k))  # 4000 independent realisations of one voxel
    twins = np.array([noise_twin(n.reshape(k, 1, 1, 1)).item() for n in noise])
    assert twins.var() == pytest.approx(noise.mean(axis=1).var(), rel=0.08)
    assert abs(np.corrcoef(twins, noise.mean(axis=1))[0, 1]) < 0.06  # an independent realisation
    assert noise_twin(rng.normal(size=(1, *SHAPE))) is None


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_noise_twin_sees_every_pair(k):
    """A corrupted pair anywhere in the input must show in the twin (it sets the noise bound)."""
    for bad in range(k):
        pairs = np.zeros((k, *SHAPE), np.float32)
        pairs[bad] = 1.0
        assert np.all(np.abs(noise_twin(pairs)) > 0.1)


def test_twin_channels_and_flag(tmp_path):
    item, volumes, _ = _write_phantom(tmp_path, num_pairs=4)
    pairs = np.moveaxis(volumes[..., 1::2] - volumes[..., 2::2], -1, 0)
    d = _chain(k=2, use_noise_twin=True)(item)
    assert d["image"].shape == (4, *SHAPE)
    np.testing.assert_allclose(d["image"][2] * d["scale"], (pairs[0] - pairs[1]) / 2, rtol=1e-4, atol=1e-3)
    assert np.all(d["image"][3] == 1.0)
    single = _chain(k=1, use_noise_twin=True)(item)  # one pair: no twin, flag 0
    assert "input_twin" not in single and np.all(single["image"][2:] == 0.0)


def test_noise_level_augmentation_shrinks_the_twin_alike(tmp_path):
    item, _, _ = _write_phantom(tmp_path, num_pairs=4)
    d = SelectPairsd(num_input_pairs=2)(LoadASLSeriesd()(item))
    truth = d["input_mean"] * 0.5
    shrink = RandNoiseLeveld(prob=1.0, factor_range=(0.3, 0.3))
    out = shrink(dict(d, truth=truth))
    np.testing.assert_allclose(out["input_mean"], truth + 0.3 * (d["input_mean"] - truth), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["input_twin"], 0.3 * d["input_twin"], rtol=1e-5, atol=1e-6)
