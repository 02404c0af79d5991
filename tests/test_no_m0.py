"""A deltaM-only series (BIDS M0Type Absent, deltam volumes: no M0 and no control image, so no guide)
keeps the plain mean's level through the shipped network, as a series with its M0 does. The network
before 0.7.0 had never seen a missing guide and read such series about half as high (issue 18, item 12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from asl_enhance.bids import find_asl_series
from asl_enhance.transforms import LoadASLSeriesd, NormalizeASLd, RestoreScaled, SelectPairsd
from helpers import phantom_series, shipped_inference, write_series

SHAPE = (40, 36, 12)


@pytest.fixture(scope="module")
def shipped():
    return shipped_inference()[0]


def _enhance(net, root, num_pairs: int = 2) -> tuple[np.ndarray, np.ndarray, str]:
    (item,) = find_asl_series(root)
    for transform in (LoadASLSeriesd("asl", num_pairs=num_pairs), SelectPairsd("pairs"), NormalizeASLd()):
        item = transform(item)
    with torch.no_grad():
        pred = net(torch.as_tensor(item["image"][None]))[0, 0].numpy()
    return RestoreScaled()({"pred": pred, "scale": item["scale"]})["pred"], item["input_mean"], item["guide_source"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deltam_only_series_keeps_the_plain_means_level(shipped, tmp_path, seed):
    volumes, types, truth = phantom_series(SHAPE, num_pairs=4, seed=seed)
    pairs = [volumes[..., i] - volumes[..., i + 1] for i in range(1, len(types), 2)]  # control - label
    write_series(tmp_path / "deltam" / "sub-01" / "perf", "sub-01", np.stack(pairs, -1), ["deltam"] * len(pairs))
    write_series(tmp_path / "full" / "sub-01" / "perf", "sub-01", volumes, types)
    head = truth > 0
    without, mean, source = _enhance(shipped, tmp_path / "deltam")
    with_m0, _, source_m0 = _enhance(shipped, tmp_path / "full")
    assert (source, source_m0) == ("none", "m0")
    level = without[head].mean() / mean[head].mean()
    assert 0.9 < level < 1.1, f"deltaM-only level {level:.2f} of the plain mean's"
    assert abs(without[head].mean() / with_m0[head].mean() - 1) < 0.1
