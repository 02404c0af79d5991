"""Transform chain: first-k selection, targets, normalisation, and scale equivariance through a
random-initialised network (scaling the series and M0 by c scales every output by c)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from asl_enhance.bids import ASLInputError, find_asl_series
from asl_enhance.networks import DilatedTwoPathwayNet, ResidualEnhancer
from asl_enhance.transforms import (
    LoadASLSeriesd,
    NormalizeASLd,
    RestoreScaled,
    SelectPairsd,
    guide_scale,
)
from helpers import phantom_series, write_series
from monai.transforms import Compose

SHAPE = (16, 14, 6)


def _chain(num_pairs=None, k=None, target="none", use_guide=True, mode="first"):
    return Compose(
        [
            LoadASLSeriesd("asl", num_pairs=num_pairs),
            SelectPairsd("pairs", num_input_pairs=k, mode=mode, target=target),
            NormalizeASLd(use_guide=use_guide),
        ]
    )


def _write_phantom(folder, stem="sub-01", scale=1.0, guide="included", seed=0, num_pairs=5):
    volumes, types, truth = phantom_series(SHAPE, num_pairs=num_pairs, seed=seed, m0_volumes=1)
    volumes = volumes * scale
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


@pytest.mark.parametrize("guide", ["included", "separate", "control", "none"])
@pytest.mark.parametrize("c", [7.25, 0.013])
def test_scale_equivariance_through_network(tmp_path, guide, c):
    torch.manual_seed(0)
    net = ResidualEnhancer(DilatedTwoPathwayNet(in_channels=1 if guide == "none" else 2, features=8), smooth_sigma=0.5)
    net.eval()
    post = RestoreScaled("pred")
    outputs = []
    for scale, folder in ((1.0, tmp_path / "a"), (c, tmp_path / "b")):
        item, _, _ = _write_phantom(folder, scale=scale, guide=guide)
        d = _chain(k=2, use_guide=guide != "none")(item)
        with torch.no_grad():
            pred = net(torch.as_tensor(d["image"])[None])[0].numpy()
        d["pred"] = pred
        outputs.append((d, pred, post(d)["pred"]))
    (d1, raw1, out1), (dc, rawc, outc) = outputs
    assert float(dc["scale"]) == pytest.approx(c * float(d1["scale"]), rel=1e-4)
    np.testing.assert_allclose(dc["image"], d1["image"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(dc["mask"], d1["mask"])
    # network output (normalised units) is unchanged, so output x scale scales by c
    np.testing.assert_allclose(rawc, raw1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rawc * float(dc["scale"]), c * raw1 * float(d1["scale"]), rtol=1e-4, atol=1e-4 * c)
    tol = 1e-4 * c * np.abs(out1).max()
    np.testing.assert_allclose(outc, c * out1, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(dc["input_mean"], c * d1["input_mean"], rtol=1e-4, atol=tol)
