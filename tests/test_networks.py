"""Networks keep any input shape (odd sizes, 2D and 3D), keep the level, respect the noise bound, and
the default network scripts with TorchScript to the same output."""

from __future__ import annotations

import pytest
import torch
from asl_enhance.layout import InputLayout
from asl_enhance.networks import DilatedTwoPathwayNet, GaussianSmooth, NoiseGatedRestore, ScaleMixingEnhancer
from helpers import BUNDLE, INPUT_CHANNELS
from monai.bundle import ConfigParser


@pytest.mark.parametrize("size", [(37, 29, 7), (16, 16, 4), (5, 3, 1)])
def test_two_pathway_3d_odd_sizes(size):
    net = DilatedTwoPathwayNet(spatial_dims=3, in_channels=2, features=8)
    with torch.no_grad():
        assert net(torch.randn(2, 2, *size)).shape == (2, 1, *size)


@pytest.mark.parametrize("size", [(37, 29), (8, 5)])
def test_two_pathway_2d(size):
    net = DilatedTwoPathwayNet(spatial_dims=2, in_channels=1, out_channels=2, features=8, dilations=(2, 4))
    with torch.no_grad():
        assert net(torch.randn(1, 1, *size)).shape == (1, 2, *size)


def test_gaussian_smooth_preserves_constants_and_shape():
    smooth = GaussianSmooth(3, (1.0, 1.5, 0.0))
    x = torch.full((2, 1, 9, 8, 3), 3.0)
    torch.testing.assert_close(smooth(x), x)
    assert GaussianSmooth(2, 0.0)(torch.randn(1, 1, 4, 4)).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError):
        GaussianSmooth(3, (1.0, 1.0))


def test_default_network_scripts_to_same_output():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, INPUT_CHANNELS, 37, 29, 7)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)


SIGMAS = [[0.0, 0.0, 0.0], [1.0, 1.0, 0.5], [2.0, 2.0, 1.0]]


def _scale_mixer(residual: bool = True):
    layout = InputLayout(use_guide=True, use_noise_twin=False)
    return ScaleMixingEnhancer(layout, SIGMAS, residual=residual, features=6).eval()


def test_scale_mixer_starts_as_the_average_blur():
    """At initialisation the weights are uniform and the residual zero: the output is the mean of the
    blurred stack, so an untrained model already smooths and keeps the level."""
    net = _scale_mixer()
    x = torch.randn(1, 2, 21, 19, 6)
    stack = torch.cat([GaussianSmooth(3, s)(x[:, :1]) for s in SIGMAS], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), stack.mean(dim=1, keepdim=True))


def test_scale_mixer_keeps_a_constant_level_whatever_the_weights():
    net = _scale_mixer(residual=False)
    for param in net.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.cat([torch.full((1, 1, 17, 15, 5), 2.5), torch.randn(1, 1, 17, 15, 5)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), torch.full((1, 1, 17, 15, 5), 2.5))


def test_scale_mixer_scripts_to_the_same_output():
    net = _scale_mixer()
    for param in net.parameters():
        torch.nn.init.normal_(param, std=0.1)
    x = torch.randn(1, 2, 23, 17, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))


def _bounded_mixer(noise_bound: float = 3.0):
    """Channels: mean, guide, twin, flag (the bundle's layout)."""
    net = ScaleMixingEnhancer(InputLayout(), SIGMAS, noise_bound=noise_bound, features=6).eval()
    for param in net.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return net


def _bounded_input(twin_scale: float, flag: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 1, 21, 19, 6, generator=generator) * 2.0
    guide = torch.rand(1, 1, 21, 19, 6, generator=generator)
    twin = twin_scale * torch.randn(1, 1, 21, 19, 6, generator=generator)
    return torch.cat([mean, guide, twin, torch.full_like(mean, flag)], dim=1)


def test_noise_bound_keeps_a_noise_free_input():
    """Twin zero (the pairs agree): the output is the k-pair mean, whatever the weights."""
    net = _bounded_mixer()
    x = _bounded_input(0.0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), x[:, :1], rtol=0, atol=1e-5)


def test_noise_bound_limits_the_change_to_the_local_noise():
    net = _bounded_mixer(noise_bound=2.0)
    free = _bounded_mixer(noise_bound=0.0)
    free.load_state_dict(net.state_dict())
    x = _bounded_input(0.05)
    local_sd = torch.sqrt(GaussianSmooth(3, [2.0, 2.0, 1.0])(x[:, 2:3] ** 2))
    with torch.no_grad():
        change, unbounded = (net(x) - x[:, :1]).abs(), (free(x) - x[:, :1]).abs()
    assert torch.all(change <= 2.0 * local_sd + 1e-5)
    assert torch.all(change <= unbounded + 1e-6)  # it only ever pulls towards the mean
    assert unbounded.max() > 4.0 * float(local_sd.max())  # so the bound did act


def test_noise_bound_leaves_single_pair_inputs_alone():
    """k = 1 has no twin (flag 0): nothing to measure the noise with, so no bound."""
    net = _bounded_mixer()
    free = _bounded_mixer(noise_bound=0.0)
    free.load_state_dict(net.state_dict())
    x = _bounded_input(0.0, flag=0.0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), free(x))


def test_noise_bound_needs_a_twin_channel():
    with pytest.raises(ValueError, match="noise twin"):
        ScaleMixingEnhancer(InputLayout(use_noise_twin=False), SIGMAS, noise_bound=3.0)


def test_bounded_mixer_scripts_to_the_same_output():
    net = _bounded_mixer()
    x = _bounded_input(0.3)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))


def test_network_sizes_its_backbone_from_the_layout():
    """The first convolution takes the layout's channels plus the blurred stack; the last gives one
    weight per width plus the residual, so configs never compute channel counts."""
    for layout in (InputLayout(), InputLayout(use_guide=False), InputLayout(use_noise_twin=False)):
        net = ScaleMixingEnhancer(layout, SIGMAS, features=4)
        assert net.backbone.stem.conv.in_channels == layout.num_channels + len(SIGMAS)
        assert net.backbone.merge[-1].conv.out_channels == len(SIGMAS) + 1
        with torch.no_grad():
            assert net(torch.randn(1, layout.num_channels, 9, 8, 3)).shape == (1, 1, 9, 8, 3)


def test_input_layout_reads_booleans_from_the_command_line():
    assert InputLayout("false", "true") == InputLayout(use_guide=False, use_noise_twin=True)
    assert InputLayout().twin_channel == 2 and InputLayout(use_guide=False).twin_channel == 1
    assert InputLayout(use_noise_twin=False).twin_channel is None
    assert InputLayout().guide_channel == 1 and InputLayout(use_guide=False).guide_channel is None
    with pytest.raises(ValueError, match="boolean"):
        InputLayout(use_guide="maybe")


def test_restore_gives_back_what_was_removed_at_coarse_scales():
    """With ``restore_sigma`` the output is y + G(x - y) for the mixer's output y: a broad change (a
    lesion filled in) comes back, the fine noise the mixer removed stays removed, and the level is kept."""
    plain = _scale_mixer()  # at initialisation: the average of the blurred stack, a broad blur
    restored = ScaleMixingEnhancer(InputLayout(True, False), SIGMAS, features=6, restore_sigma=1.5).eval()
    restored.load_state_dict(plain.state_dict())
    x = torch.zeros(1, 2, 40, 40, 6)
    x[:, 0] = 1.0
    x[:, 0, 17:23, 17:23, :] = 0.2  # a 6-voxel hypoperfused block
    noise = 0.3 * torch.randn(1, 1, 40, 40, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_plain, y_restored = plain(x), restored(x)
        noise_plain = plain(x + torch.cat([noise, torch.zeros_like(noise)], 1)) - y_plain
        noise_restored = restored(x + torch.cat([noise, torch.zeros_like(noise)], 1)) - y_restored
    inside = (slice(None), 0, slice(19, 21), slice(19, 21))
    assert y_restored[inside].mean() < y_plain[inside].mean() - 0.05  # the block's contrast comes back
    torch.testing.assert_close(y_restored.mean(), x[:, 0].mean(), atol=1e-3, rtol=0)
    assert noise_restored.std() < 0.8 * noise.std()  # most of the fine noise is still removed
    assert noise_restored.std() > noise_plain.std()  # (at a price: a little comes back)
    with torch.no_grad():  # and where the mixer changed nothing, nothing is given back
        flat = torch.cat([torch.full((1, 1, 17, 15, 5), 2.5), torch.rand(1, 1, 17, 15, 5)], dim=1)
        torch.testing.assert_close(restored(flat), torch.full((1, 1, 17, 15, 5), 2.5))


def test_restore_scripts_and_is_off_by_default():
    net = ScaleMixingEnhancer(InputLayout(), SIGMAS, noise_bound=3.0, restore_sigma=[1.5, 1.5, 0.75], features=6)
    assert ScaleMixingEnhancer(InputLayout(), SIGMAS).restore.identity and not net.restore.identity
    x = _bounded_input(0.5)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net.eval())(x), net(x))


FINE_BANDS = [[1.5, 1.5, 0.75], [0.75, 0.75, 0.4], [0.0, 0.0, 0.0]]


def _noise(seed: int, shape=(1, 1, 40, 40, 8), sd: float = 1.0) -> torch.Tensor:
    return sd * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_gate_keeps_removed_noise_out_and_a_removed_lesion_in():
    """Removed noise, with an independent draw of it as the noise: little comes back. A removed block
    (a lesion filled in) over that noise: most of it comes back."""
    gate = NoiseGatedRestore(3, FINE_BANDS, alpha=[1, 1, 3])
    removed_noise, draw = _noise(0), _noise(1)
    assert gate(removed_noise, draw).std() < 0.3 * removed_noise.std()
    block = torch.zeros_like(draw)
    block[:, :, 14:26, 14:26, 2:6] = 2.0
    back = gate(block + removed_noise, draw)
    assert back[:, :, 17:23, 17:23, 3:5].mean() > 0.8 * 2.0
    assert back[:, :, :8, :8].abs().mean() < 0.3 * removed_noise.abs().mean()
    with pytest.raises(ValueError, match="one value per band"):
        NoiseGatedRestore(3, FINE_BANDS, alpha=[1, 1])


def _gated(noise_bound: float = 0.0) -> ScaleMixingEnhancer:
    return ScaleMixingEnhancer(
        InputLayout(),
        SIGMAS,
        noise_bound=noise_bound,
        features=6,
        restore_bands=FINE_BANDS,
        restore_alpha=[1, 1, 3],
        restore_sigma=[1.5, 1.5, 0.75],
    ).eval()


def test_gate_returns_a_noise_free_input_whole_and_scales():
    """Twin zero (the pairs agree, or all pairs of a clean scan): every band is perfusion, the input
    comes back whole even without the noise bound; scaling the input scales the output."""
    net = _gated()
    x = _bounded_input(0.0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), x[:, :1], atol=1e-5, rtol=0)
        noisy = _bounded_input(0.7)
        scaled = noisy.clone()
        scaled[:, [0, 2]] *= 10.0
        torch.testing.assert_close(net(scaled), 10.0 * net(noisy), atol=1e-4, rtol=1e-4)


def test_gate_applies_with_a_twin_and_the_fixed_restore_without():
    """k = 1 (no twin, flag 0): the fixed coarse restore; k >= 2: the gate; both script."""
    gated, fixed = _gated(), ScaleMixingEnhancer(InputLayout(), SIGMAS, features=6, restore_sigma=[1.5, 1.5, 0.75])
    fixed.load_state_dict(gated.state_dict())
    single, paired = _bounded_input(0.0, flag=0.0), _bounded_input(0.7)
    with torch.no_grad():
        torch.testing.assert_close(gated(single), fixed.eval()(single))
        assert (gated(paired) - fixed(paired)).abs().max() > 1e-3
        scripted = torch.jit.script(gated)
        torch.testing.assert_close(scripted(paired), gated(paired))
    with pytest.raises(ValueError, match="noise twin"):
        ScaleMixingEnhancer(InputLayout(use_noise_twin=False), SIGMAS, restore_bands=FINE_BANDS)


def _small_lesion_scene(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[slice, ...]]:
    """What a mixer removed from a scan (perfusion texture the noise hides in places, plus noise), the
    small lesion it also filled in, and an independent draw of that noise."""
    texture = GaussianSmooth(3, [1.0, 1.0, 0.5])(_noise(seed, sd=6.0))
    core = (slice(None), slice(None), slice(18, 22), slice(18, 22), slice(3, 5))
    lesion = torch.zeros_like(texture)
    lesion[core] = -1.5
    return texture + _noise(seed + 1), lesion, _noise(seed + 2), core


def test_scan_floor_brings_back_a_small_lesion_not_noise():
    """The local gain under-reads a small lesion in noise; the floor (the band's median gain over the
    head) gives more of it back. On removed noise alone the median gain is near zero: still no noise."""
    removed, lesion, draw, core = _small_lesion_scene(3)

    def lesion_back(gate: NoiseGatedRestore) -> float:
        return float((gate(removed, draw) - gate(removed + lesion, draw))[core].mean())

    plain = NoiseGatedRestore(3, FINE_BANDS, alpha=[1, 1, 3])
    floored = NoiseGatedRestore(3, FINE_BANDS, alpha=[1, 1, 3], scan_floor=1.0)
    assert lesion_back(floored) > lesion_back(plain) + 0.05
    noise, other = _noise(5), _noise(6)
    assert floored(noise, other).std() < 0.35 * noise.std()
    assert NoiseGatedRestore(3, FINE_BANDS).scan_floor == 0.0  # off unless asked
    with pytest.raises(ValueError, match="scan_floor"):
        NoiseGatedRestore(3, FINE_BANDS, scan_floor=-1.0)


def test_scan_floor_is_the_median_over_the_head():
    gain = torch.ones(2, 1, 4, 4, 2)
    head = torch.zeros(2, 1, 4, 4, 2, dtype=torch.bool)
    gain[0, :, :1] = 0.2  # a quarter of the volume, all of the head
    head[0, :, :1] = True
    head[1] = True
    medians = NoiseGatedRestore.head_median(gain, head)
    torch.testing.assert_close(medians.flatten(), torch.tensor([0.2, 1.0]))
    assert medians.shape == (2, 1, 1, 1, 1)
    torch.testing.assert_close(NoiseGatedRestore.head_median(gain, None).flatten(), torch.tensor([1.0, 1.0]))
    no_head = torch.zeros_like(head)  # a deltaM-only series: zero guide, no head; every voxel counts
    torch.testing.assert_close(NoiseGatedRestore.head_median(gain, no_head).flatten(), torch.tensor([1.0, 1.0]))


def test_scan_floor_keeps_a_clean_input_whole_and_scripts():
    net = ScaleMixingEnhancer(
        InputLayout(), SIGMAS, features=6, restore_bands=FINE_BANDS, restore_alpha=[1, 1, 3], restore_scan_floor=1.0
    ).eval()
    with torch.no_grad():
        clean = _bounded_input(0.0)
        torch.testing.assert_close(net(clean), clean[:, :1], atol=1e-5, rtol=0)
        noisy = _bounded_input(0.7)
        torch.testing.assert_close(torch.jit.script(net)(noisy), net(noisy))


def _scan_tested(test: float = 4.0) -> ScaleMixingEnhancer:
    return ScaleMixingEnhancer(
        InputLayout(), SIGMAS, features=6, restore_bands=FINE_BANDS, restore_alpha=[1, 1, 3], restore_scan_test=test
    ).eval()


def test_scan_test_gives_the_networks_blur_alone_to_pairs_that_show_no_perfusion():
    """Input as strong as its twin at the coarsest band (no perfusion: a phantom, an artefact-dominated short
    scan): the output is the network's mix of blurs alone (weights summing to one: no residual, no restore).
    An input far above its twin there gets the plain gate's output; both script."""
    net, plain = _scan_tested(), _gated()
    with torch.no_grad():
        for p in net.backbone.parameters():  # a trained-looking residual, so that leaving it out shows
            p.normal_(0.0, 0.2)
        plain.load_state_dict(net.state_dict())
        x = _bounded_input(0.7)
        assert float(net.scan_ratio(x)) > 4.0  # the test input shows perfusion
        torch.testing.assert_close(net(x), plain(x))
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))
        no_perfusion = x.clone()
        no_perfusion[:, 2:3] = x[:, :1]  # the twin as strong as the input: S = 1, share 0
        assert float(net.scan_share(no_perfusion)) == 0.0
        mixed, weights = net.mix(no_perfusion)
        blur_only = (weights * net.blur_stack(no_perfusion[:, :1])).sum(dim=1, keepdim=True)
        torch.testing.assert_close(net(no_perfusion), blur_only)
        assert (blur_only - mixed).abs().max() > 1e-3  # the residual it left out
        half = x.clone()
        half[:, 2:3] = x[:, :1] / 2.0  # S = 4 exactly: share 1
        assert float(net.scan_share(half)) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="restore_scan_test"):
        _scan_tested(1.0)
    with pytest.raises(ValueError, match="restore_scan_test"):
        ScaleMixingEnhancer(InputLayout(), SIGMAS, restore_scan_test=4.0)  # no bands to test


def _sure_net() -> ScaleMixingEnhancer:
    """An untrained mixer (the average blur) with the gate and the blend from 3 pairs."""
    return ScaleMixingEnhancer(
        InputLayout(), SIGMAS, features=6, restore_bands=FINE_BANDS, restore_alpha=[1, 1, 3], restore_sure_from=3
    ).eval()


def test_sure_blend_acts_from_its_k_and_lies_between_the_mix_and_the_restore():
    """Below ``restore_sure_from`` pairs (or without a count) the restored map; from it on, mixed + w (restored -
    mixed) with w in [0, 1], plus the constant that keeps the restored map's head mean; a clean input (twin
    zero) comes back whole; it scripts."""
    net = _sure_net()
    x = _bounded_input(1.5)  # an input as noisy as this gets a blend strictly inside (0, 1)
    with torch.no_grad():
        restored, mixed = net(x), net.mix(x)[0]
        torch.testing.assert_close(net(x, torch.tensor([2])), restored)
        blended = net(x, torch.tensor([4]))
        step = restored - mixed
        change = blended - mixed - (blended - mixed).mean()  # a constant keeps the restored head mean
        w = float((change * step).sum() / ((step - step.mean()) ** 2).sum())
        assert 0.1 < w < 0.9
        head = x[:, 1:2] > 0.25  # the guide's head, where the level is kept
        torch.testing.assert_close(blended[head].mean(), restored[head].mean(), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            blended - w * step - mixed, (blended - w * step - mixed).mean().expand_as(mixed), atol=1e-4, rtol=0
        )
        single = _bounded_input(0.0, flag=0.0)  # no twin: never blended, whatever the count
        torch.testing.assert_close(net(single, torch.tensor([4])), net(single))
        clean = _bounded_input(0.0)
        torch.testing.assert_close(net(clean, torch.tensor([4])), clean[:, :1], atol=1e-5, rtol=0)
        two = torch.cat([x, x])
        torch.testing.assert_close(torch.jit.script(net)(two, torch.tensor([2, 4])), net(two, torch.tensor([2, 4])))
    with pytest.raises(ValueError, match="restore_sure_from"):
        ScaleMixingEnhancer(InputLayout(), SIGMAS, restore_bands=FINE_BANDS, restore_sure_from=1)
    assert ScaleMixingEnhancer(InputLayout(), SIGMAS, restore_sure_from=3).sure_from == 0  # no restore: no blend


@pytest.mark.parametrize("extra", [{}, {"restore_scan_test": 4.0, "restore_scan_floor": 1.0}, {"noise_bound": 3.0}])
def test_finish_probe_channel_is_the_restore_of_the_moved_input(extra):
    """The blend's divergence pass (a second channel of one ``finish``) equals ``finish`` run on the input
    moved by epsilon twins with the mix's weights held, whatever the gate's options."""
    net = ScaleMixingEnhancer(
        InputLayout(), SIGMAS, features=6, restore_bands=FINE_BANDS, restore_alpha=[1, 1, 3], **extra
    ).eval()
    x = _bounded_input(1.5)
    eps = 0.1
    with torch.no_grad():
        mixed, weights = net.mix(x)
        twin = x[:, net.twin_channel : net.twin_channel + 1]
        moved = (weights * net.blur_stack(twin)).sum(dim=1, keepdim=True)
        both = net.finish(x, mixed, weights, eps)
        plus = x.clone()
        plus[:, :1] += eps * twin
        torch.testing.assert_close(both[:, :1], net.finish(x, mixed, weights))
        torch.testing.assert_close(both[:, 1:], net.finish(plus, mixed + eps * moved, weights), atol=1e-5, rtol=1e-5)


def test_sure_blend_picks_the_lower_risk_on_a_known_truth():
    """The shipped network on a phantom with known deltaM, 4 pairs of white noise: at low noise the restore's
    error is far below the network's blur and the blend keeps it; where the two are close the risk-chosen
    blend beats both (a wrong sign in the estimate would pick the worse end)."""
    import numpy as np
    from asl_enhance.transforms import network_input, noise_twin
    from helpers import phantom_series, shipped_inference

    net, _ = shipped_inference()
    for seed, sd in ((0, 0.5), (0, 15.0), (1, 15.0), (2, 15.0)):
        volumes, _, truth = phantom_series(shape=(32, 30, 10), num_pairs=1, seed=seed)
        pairs = (truth[None] + np.random.default_rng(seed).normal(0, sd, (4, *truth.shape))).astype(np.float32)
        image, scale, _ = network_input(pairs.mean(axis=0), volumes[..., 0], twin=noise_twin(pairs))
        x = torch.as_tensor(image[None])
        with torch.no_grad():
            mixed, weights = net.mix(x)
            ends = [mixed, net.finish(x, mixed, weights)]
            blended = net(x, torch.tensor([4]))
        head = volumes[..., 0] > 0
        blend_error, mix_error, restored_error = (
            float(((out[0, 0].numpy() * scale - truth)[head] ** 2).mean()) for out in (blended, *ends)
        )
        if sd < 1:
            assert blend_error <= 1.05 * restored_error < 0.1 * mix_error
        else:
            assert blend_error < min(mix_error, restored_error)


def test_inference_config_gives_the_network_its_pair_count():
    """The blend depends on k: inference.json's evaluator hands each batch's ``num_pairs_used`` to the network
    as ``num_pairs`` (MONAI's PrepareBatchExtraInput), and the network it builds blends from 3 pairs."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    prepare = parser.get_parsed_content("evaluator#prepare_batch")
    image = torch.zeros(1, INPUT_CHANNELS, 4, 4, 2)
    inputs, _, args, kwargs = prepare({"image": image, "num_pairs_used": torch.tensor([4])}, torch.device("cpu"))
    assert inputs.shape == image.shape and not args
    assert kwargs["num_pairs"].tolist() == [4]
    assert parser.get_parsed_content("network_def").sure_from == 3
