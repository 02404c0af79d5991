"""InputRelativeLoss: every noise level counts alike; AppendInputToLabeld packs what it needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from asl_enhance.losses import InputRelativeLoss
from asl_enhance.transforms import AppendInputToLabeld


def _label(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return torch.cat([target, source], dim=1)


def test_returning_the_input_scores_the_same_at_every_noise_level():
    """Identity output: loss = Huber/MSE of the input itself, the same (0.5 in Huber's quadratic
    range) whether the input is noisy or nearly clean; an absolute loss would differ 10^4-fold."""
    torch.manual_seed(0)
    target = torch.rand(1, 1, 12, 12, 4)
    noise = torch.randn_like(target)
    loss = InputRelativeLoss(eps=0.0)
    values = [loss(target + f * noise, _label(target, target + f * noise)).item() for f in (0.3, 0.003)]
    assert values == pytest.approx([0.5, 0.5], rel=0.05)


def test_blurring_a_clean_sample_costs_as_much_as_leaving_a_noisy_one():
    """A batch of one noisy and one clean sample: each is weighted by its own input error."""
    torch.manual_seed(1)
    target = torch.rand(2, 1, 12, 12, 4)
    source = target.clone()
    source[0] += 0.5 * torch.randn_like(target[0])
    source[1] += 0.005 * torch.randn_like(target[1])
    pred = source.clone()
    pred[1] = target[1] + 0.05  # the clean sample made 10x worse than its input
    loss = InputRelativeLoss(eps=0.0)
    # noisy sample left as it came: 0.5; clean one: 0.5 * 0.05^2 / 0.005^2 = 50; mean 25.25
    assert loss(pred, _label(target, source)).item() == pytest.approx(25.25, rel=0.1)
    assert loss(source, _label(target, source)).item() == pytest.approx(0.5, rel=0.05)
    assert loss(target, _label(target, source)).item() == pytest.approx(0.0, abs=1e-12)


def test_relative_loss_refuses_a_one_channel_label_and_a_reduced_base():
    with pytest.raises(ValueError, match="2 channels"):
        InputRelativeLoss()(torch.zeros(1, 1, 4, 4, 2), torch.zeros(1, 1, 4, 4, 2))
    with pytest.raises(ValueError, match="reduction"):
        InputRelativeLoss(torch.nn.MSELoss())


def test_append_input_to_label_packs_target_then_input_channel():
    image = np.random.default_rng(0).normal(size=(4, 6, 5, 3)).astype(np.float32)
    label = np.ones((1, 6, 5, 3), np.float32)
    out = AppendInputToLabeld()({"image": image, "label": label})
    assert out["label"].shape == (2, 6, 5, 3)
    np.testing.assert_array_equal(out["label"][0], label[0])
    np.testing.assert_array_equal(out["label"][1], image[0])
