"""The training-data simulator: the white-noise alternative changes only the pair-to-pair
fluctuation (same subject, same truth), and its noise is white and as strong in the background as
in the head, unlike the physiological model fitted to the real scan."""

from __future__ import annotations

import numpy as np
import pytest

import asl_sim.simulator as sim


def _clean_subject(noise_model: str) -> dict:
    """First quick subject without a corrupted pair (their motion would add edge correlation)."""
    for subject in range(1, 40):
        out = sim.simulate_subject(0, subject, num_pairs=6, quick=True, noise_model=noise_model)
        if not out["params"]["noise"]["corrupted_pairs"]:
            return out
    raise AssertionError("no clean subject")


@pytest.fixture(scope="module")
def subjects() -> dict[str, dict]:
    return {model: _clean_subject(model) for model in sim.NOISE_MODELS}


def test_white_noise_keeps_the_subject(subjects):
    white, phys = subjects["white"], subjects["physiological"]
    assert white["params"]["subject"] == phys["params"]["subject"]
    np.testing.assert_array_equal(white["truth_deltam"], phys["truth_deltam"])
    assert white["params"]["noise_model"] == "white"
    assert white["params"]["noise"]["snr"] == phys["params"]["noise"]["snr"]


def test_white_noise_is_uncorrelated_and_uniform(subjects):
    white = subjects["white"]["params"]["measured_noise_statistics"]
    phys = subjects["physiological"]["params"]["measured_noise_statistics"]
    assert abs(white["corr_x_head"]) < 0.15 and abs(white["corr_y_head"]) < 0.15
    assert phys["corr_x_head"] > white["corr_x_head"] + 0.15
    # magnitude noise in the empty background is Rayleigh (std 0.66 sigma), so white reads about 1.5
    assert white["ratio_head_background"] < 2.5 < phys["ratio_head_background"]


def test_unknown_noise_model_is_refused():
    with pytest.raises(ValueError, match="noise_model"):
        sim.simulate_subject(0, 1, num_pairs=4, quick=True, noise_model="pink")
