"""The enhanced map's SD map (asl_enhance.uncertainty): the noise contrasts, coverage on a series with
known noise, zero for a noise-free series, scale equivariance, the handler in an engine's iteration, the
written files (names, float32, affine, sidecars, CBF SD), the QC row and the evaluation columns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
from asl_enhance import uncertainty as unc
from asl_enhance.bids import find_asl_series
from asl_enhance.evaluation import EVALUATION_COLUMNS, ASLEvaluationWriter, sd_scores
from asl_enhance.networks import ScaleMixingEnhancer, input_perfusion_ratio
from asl_enhance.qc import write_qc_figure
from asl_enhance.transforms import LoadASLSeriesd, NormalizeASLd, SelectPairsd, network_input, noise_twin
from asl_enhance.writers import ASLOutputWriter, scan_test_fields, series_maps, write_deltam_maps
from helpers import AFFINE, phantom_series, shipped_inference, write_series

SHAPE = (20, 18, 8)


@pytest.fixture(scope="module")
def shipped():
    """The shipped network and SD handler as inference.json builds them (weights from models/model.pt)."""
    net, parser = shipped_inference()
    return net, parser.get_parsed_content("uncertainty")


def test_shipped_calibration_is_the_modules_table(shipped):
    """inference.json spells the (a, b) table out for users; it must be the module's CALIBRATION, which a
    handler built without one uses: one refit, both updated."""
    _, handler = shipped
    assert handler.calibration == {k: tuple(v) for k, v in unc.CALIBRATION.items()}


def _sd(net, handler, pairs: np.ndarray, guide: np.ndarray, raw: bool = False):
    """(pred, sd) in the pairs' units for a k-pair input, as the bundle computes them."""
    image, scale, _ = network_input(pairs.mean(axis=0), guide, twin=noise_twin(pairs))
    x = torch.as_tensor(image[None])
    with torch.no_grad():
        pred = net(x)
        sd = handler.sd_map(net, x, pred, [pairs / scale], raw=raw)
    return pred[0, 0].numpy() * scale, None if sd is None else sd[0, 0].numpy() * scale


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_noise_contrasts_are_independent_draws_of_the_mean_noise(k):
    weights = unc.noise_contrasts(k)
    assert weights.shape == (k - 1, k)
    np.testing.assert_allclose(weights.sum(axis=1), 0.0, atol=1e-12)  # no perfusion
    np.testing.assert_allclose((weights**2).sum(axis=1), 1.0 / k, rtol=1e-6)  # the k-pair mean's variance
    gram = weights @ weights.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-12)  # independent draws
    np.testing.assert_allclose(weights[0], noise_twin(np.eye(k)[:, :, None, None]).ravel(), rtol=1e-6)
    assert unc.noise_contrasts(1).shape == (0, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_z2_near_one_on_a_series_with_known_noise(seed):
    """A network that is linear in the k-pair mean (the untrained mixer: the average of its blur stack,
    no noise bound) has no bias on a constant map, so its error is its response to the input noise
    and the raw map must cover it. White noise, 32x32x12 voxels, k = 2: over 8 seeds the mean z^2 was
    1.02 +- 0.02 (a local SD from a window of finite size is itself noisy, so 1/sd^2 is biased up by a
    few percent) and coverage 0.942-0.950; the tolerance, 1 +- 0.1, is four of those spreads."""
    torch.manual_seed(0)
    net = ScaleMixingEnhancer(noise_bound=0.0).eval()
    rng = np.random.default_rng(seed)
    shape = (32, 32, 12)
    truth = np.ones(shape, np.float32)
    pairs = truth + rng.normal(0.0, 0.5, (2, *shape)).astype(np.float32)
    pred, sd = _sd(net, unc.EnhancedSDHandler(), pairs, np.ones(shape), raw=True)
    z2 = (pred - truth) ** 2 / sd**2
    assert z2.mean() == pytest.approx(1.0, abs=0.1)
    assert np.mean(z2 <= 1.96**2) == pytest.approx(0.95, abs=0.02)


def test_noise_free_series_gives_a_zero_map(shipped):
    net, handler = shipped
    volumes, types, deltam = phantom_series(SHAPE, num_pairs=2)
    m0 = volumes[..., 0]
    pairs = np.stack([deltam, deltam]).astype(np.float32)  # identical pairs: no noise
    pred, sd = _sd(net, handler, pairs, m0)
    assert np.abs(pred).max() > 0
    assert np.abs(sd).max() <= 1e-6 * np.abs(deltam).max()


@pytest.mark.parametrize("k", [2, 4])
def test_scaling_the_input_scales_the_map(shipped, k):
    net, handler = shipped
    volumes, types, _ = phantom_series(SHAPE, num_pairs=k, seed=3)
    m0 = volumes[..., 0]
    control = volumes[..., 1::2][..., :k]
    label = volumes[..., 2::2][..., :k]
    pairs = np.moveaxis(control - label, -1, 0).astype(np.float32)
    _, sd = _sd(net, handler, pairs, m0)
    _, sd_scaled = _sd(net, handler, 7.5 * pairs, 7.5 * m0)
    assert sd.max() > 0
    np.testing.assert_allclose(sd_scaled, 7.5 * sd, rtol=1e-3, atol=1e-6 * sd.max())


def test_single_pair_map_scales_and_needs_its_calibration(shipped):
    """k = 1: the map comes from the pair's high-pass (no twin): it scales with the input, and a handler
    asked for it without a k = 1 calibration refuses at construction."""
    net, handler = shipped
    volumes, _, _ = phantom_series(SHAPE, num_pairs=1, seed=4)
    pairs = (volumes[..., 1:2] - volumes[..., 2:3]).transpose(3, 0, 1, 2).astype(np.float32)
    _, sd = _sd(net, handler, pairs, volumes[..., 0])
    _, sd_scaled = _sd(net, handler, 7.5 * pairs, 7.5 * volumes[..., 0])
    assert sd.max() > 0
    np.testing.assert_allclose(sd_scaled, 7.5 * sd, rtol=1e-3, atol=1e-6 * sd.max())
    with pytest.raises(ValueError, match="k = 1"):
        unc.EnhancedSDHandler(calibration={2: (1.0, 0.0)}, single_pair=True)


def test_more_draws_use_the_other_pair_contrasts(shipped):
    net, _ = shipped
    volumes, _, _ = phantom_series(SHAPE, num_pairs=4, seed=5)
    pairs = np.moveaxis(volumes[..., 1::2] - volumes[..., 2::2], -1, 0).astype(np.float32)
    one = _sd(net, unc.EnhancedSDHandler(draws=1), pairs, volumes[..., 0], raw=True)[1]
    three = _sd(net, unc.EnhancedSDHandler(draws=3), pairs, volumes[..., 0], raw=True)[1]
    assert not np.allclose(one, three)
    # three independent draws estimate the same SD: same size on average, each voxel within a factor
    assert np.mean(three**2) / np.mean(one**2) == pytest.approx(1.0, abs=0.5)


def test_calibration_table_by_k_and_the_head_term():
    table = {"2": [2.0, 0.5], "3": [1.9, 0.4], "4": 1.8}
    factors = [unc.calibration_factor(k, table) for k in (1, 2, 3, 4, 8)]
    assert factors == [(2.0, 0.5), (2.0, 0.5), (1.9, 0.4), (1.8, 0.0), (1.8, 0.0)]
    assert unc.calibration_factor(3, {}) == (1.0, 0.0)
    raw = torch.zeros((1, 4, 4, 2))
    raw[0, 0, 0, 0] = 4.0
    mask = torch.zeros_like(raw)
    mask[0, :2, :2, 0] = 1.0  # head: 4 voxels, RMS of the raw map there = sqrt(16 / 4) = 2
    out = unc.calibrate(raw, mask, 3.0, 0.5)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor((9.0 * 16.0 + 0.25 * 4.0) ** 0.5))
    torch.testing.assert_close(out[0, 1, 1, 0], torch.tensor(1.0))  # in the head, the head term alone: 0.5 * 2
    torch.testing.assert_close(out[0, 3, 3, 1], torch.tensor(0.0))  # outside: the noise response alone (none)
    everywhere = unc.calibrate(raw, None, 3.0, 0.5)  # no mask: the RMS and the term over the whole volume
    torch.testing.assert_close(everywhere[0, 3, 3, 1], torch.tensor(0.5 * (16.0 / 32) ** 0.5))


def _items(root, num_pairs, pred_scale: float = 0.9):
    chain = [LoadASLSeriesd("asl", num_pairs=num_pairs), SelectPairsd("pairs"), NormalizeASLd()]
    items = []
    for item in find_asl_series(root):
        for transform in chain:
            item = transform(item)
        item["pred"] = (item["input_mean"] * pred_scale)[None]
        items.append(item)
    return items


@pytest.fixture()
def dataset(tmp_path):
    volumes, types, _ = phantom_series(SHAPE, num_pairs=4, seed=1)
    write_series(tmp_path / "data" / "sub-01" / "perf", "sub-01", volumes, types)
    return tmp_path / "data"


def _engine(net, items):
    """What the handler sees at MODEL_COMPLETED: decollated batch and output lists, the network."""
    batch = [{**it, "image": torch.as_tensor(it["image"])} for it in items]
    output = [{"pred": torch.as_tensor(it["pred"]) * 1.0} for it in items]
    return SimpleNamespace(state=SimpleNamespace(batch=batch, output=output), network=net)


def test_handler_puts_an_sd_map_into_each_output_item(shipped, dataset):
    net, handler = shipped
    items = _items(dataset, 2) + _items(dataset, 1)
    with torch.no_grad():
        for it in items:
            it["pred"] = (net(torch.as_tensor(it["image"][None]))[0] * float(it["scale"])).numpy()
    engine = _engine(net, items)
    handler(engine)
    two, one = engine.state.output
    assert two["pred_sd"].shape == two["pred"].shape and float(two["pred_sd"].min()) >= 0
    assert float(two["pred_sd"].max()) > 0
    info = json.loads(two["pred_sd_info"])
    assert "noise twin" in info["UncertaintyMethod"] and info["UncertaintySettings"]["draws"] == 1
    assert float(one["pred_sd"].max()) > 0  # one pair: a map from its high-pass, flagged as assumed
    assert "ASSUMED" in json.loads(one["pred_sd_info"])["UncertaintyAssumptions"][0]
    # the map is the one sd_map gives for that item alone
    image = torch.as_tensor(items[0]["image"][None])
    pred = torch.as_tensor(items[0]["pred"][None]) / float(items[0]["scale"])
    mask = torch.as_tensor(items[0]["mask"][None])
    alone = handler.sd_map(net, image, pred, [np.zeros((2, 1, 1, 1))], masks=mask)[0] * float(items[0]["scale"])
    torch.testing.assert_close(two["pred_sd"], alone, rtol=1e-5, atol=1e-7)


def test_one_series_outside_ignite_gets_the_same_map_and_files(shipped, dataset, tmp_path):
    """The MONAI Deploy app's path (item_sd, series_maps, write_deltam_maps): the same SD map the bundle's
    handler makes, written beside the enhanced map with its method; k = 1 says why there is none."""
    net, handler = shipped
    (two,) = _items(dataset, 2)
    (one,) = _items(dataset, 1)
    for it in (two, one):
        with torch.no_grad():
            it["pred"] = (net(torch.as_tensor(it["image"][None]))[0] * float(it["scale"])).numpy()
    engine = _engine(net, [two])
    handler(engine)
    image = torch.as_tensor(two["image"][None])
    pred = torch.as_tensor(two["pred"][None]) / float(two["scale"])
    sd, fields = handler.item_sd(net, two, image, pred)
    np.testing.assert_allclose(sd, engine.state.output[0]["pred_sd"][0].numpy(), rtol=1e-5, atol=1e-7)
    assert fields == json.loads(engine.state.output[0]["pred_sd_info"])
    one_image, one_pred = torch.as_tensor(one["image"][None]), torch.as_tensor(one["pred"][None]) / float(one["scale"])
    single, single_fields = handler.item_sd(net, one, one_image, one_pred)
    assert single is not None and single.max() > 0 and "high-pass" in single_fields["UncertaintyMethod"]
    off = unc.EnhancedSDHandler(calibration=handler.calibration, single_pair=False)
    none, why = off.item_sd(net, one, one_image, one_pred)
    assert none is None and "single pair" in why["UncertaintyMapNotWrittenReason"]

    result = {"enhanced": two["pred"][0], "mean": two["input_mean"], "enhancedsd": sd, "sd_fields": fields, **two}
    maps, map_fields = series_maps(result)
    paths = write_deltam_maps(tmp_path / "out", two, maps, AFFINE, {"PairsUsed": [1, 2]}, map_fields=map_fields)
    perf = tmp_path / "out" / "sub-01" / "perf"
    assert perf / "sub-01_desc-enhancedsd_deltam.nii.gz" in paths
    np.testing.assert_allclose(nib.load(perf / "sub-01_desc-enhancedsd_deltam.nii.gz").get_fdata(), sd, rtol=1e-6)
    sd_sidecar = json.loads((perf / "sub-01_desc-enhancedsd_deltam.json").read_text())
    enhanced_sidecar = json.loads((perf / "sub-01_desc-enhanced_deltam.json").read_text())
    assert sd_sidecar["UncertaintyMethod"] == fields["UncertaintyMethod"] and sd_sidecar["PairsUsed"] == [1, 2]
    assert enhanced_sidecar["UncertaintyMap"] == "sub-01_desc-enhancedsd_deltam.nii.gz"
    assert "UncertaintyMethod" not in enhanced_sidecar
    maps, map_fields = series_maps({**result, "enhancedsd": None, "sd_fields": why})
    assert set(maps) == {"enhanced", "mean"} and map_fields == {"enhanced": why}
    perfusion = scan_test_fields(two, {"restore_bands": [[2.5, 2.5, 1.25]], "restore_scan_test": 0})
    assert perfusion["InputPerfusionToNoise"] > 4  # the phantom's 2 pairs show their perfusion
    _, map_fields = series_maps({**result, "perfusion_fields": perfusion})
    assert map_fields["enhanced"]["InputPerfusionToNoise"] == perfusion["InputPerfusionToNoise"]
    assert "InputPerfusionToNoise" not in map_fields["enhancedsd"]


def test_one_volume_averaging_several_pairs_is_flagged():
    """A single input volume that averages several acquired pairs (TotalAcquiredPairs) cannot have its noise
    measured; the enhanced sidecar says so. Two or more volumes have a twin, and a single real pair is the
    design case: no note for either."""
    settings = {"restore_bands": [[2.5, 2.5, 1.25]], "restore_scan_test": 0}
    one = {"stem": "x", "input_pairs": "[0]", "pairs_averaged": 8.0}
    note = scan_test_fields(one, settings)["InputAveragedPairsNote"]
    assert "averages 8 acquired pairs" in note and "two or more volumes" in note
    assert scan_test_fields(dict(one, pairs_averaged=1.0), settings) == {}
    assert scan_test_fields(dict(one, input_pairs="[0, 1]"), {"restore_bands": []}) == {}


def test_sidecar_s_is_the_one_the_networks_scan_test_acts_on():
    """Before, the sidecar measured S in the input's head mask (guide above 20 % of its 99th percentile),
    the network in its own (guide above a quarter of its head mean): up to 13 % apart on real scans. A dim rim
    inside the first and outside the second, full of noise, tells them apart."""
    rng = np.random.default_rng(3)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (32, 32, 8)], indexing="ij")
    r = np.sqrt(x**2 + y**2)
    rim = (r >= 0.6) & (r < 0.66)  # 20.5 % of the guide's top: above 20 % of it, below a quarter of its head mean
    guide = np.where(r < 0.6, 1000.0, np.where(rim, 205.0, 0.0)).astype(np.float32)
    perfusion = 10.0 * (r < 0.6)
    pairs = (perfusion + rng.normal(0, 2, (2, *guide.shape)) * (1 + 9 * rim)).astype(np.float32)
    item = NormalizeASLd(keys=("input_mean",))(SelectPairsd(num_input_pairs=2)({"pairs": pairs, "guide": guide}))
    net = ScaleMixingEnhancer(restore_bands=[[2.5, 2.5, 1.25]]).eval()
    with torch.no_grad():
        network_s = float(net.scan_ratio(torch.as_tensor(item["image"][None])))
    fields = scan_test_fields(dict(item, stem="x"), {"restore_bands": [[2.5, 2.5, 1.25]], "restore_scan_test": 0})
    assert fields["InputPerfusionToNoise"] == pytest.approx(network_s, abs=1e-3)
    in_input_mask = input_perfusion_ratio(item["input_mean"], item["input_twin"], [2.5, 2.5, 1.25], item["mask"][0] > 0)
    assert abs(in_input_mask / network_s - 1) > 0.05  # the old mask would have read another S here


def test_writer_files_follow_the_output_contract(tmp_path, dataset):
    items = _items(dataset, 2)
    item = items[0]
    rng = np.random.default_rng(0)
    item["pred_sd"] = np.abs(rng.normal(1.0, 0.2, (1, *SHAPE))).astype(np.float32)
    item["pred_sd_info"] = json.dumps(unc.EnhancedSDHandler().describe(2))
    out = tmp_path / "out"
    ASLOutputWriter(str(out), bundle_version="9.9.9", write_cbf=True, write_qc=True).write_series(item)
    perf = out / "sub-01" / "perf"
    deltam_sd = nib.load(perf / "sub-01_desc-enhancedsd_deltam.nii.gz")
    cbf_sd = nib.load(perf / "sub-01_desc-enhancedsd_cbf.nii.gz")
    for image in (deltam_sd, cbf_sd):
        assert image.get_data_dtype() == np.float32 and image.shape == SHAPE
        np.testing.assert_allclose(image.affine, AFFINE)
    np.testing.assert_allclose(deltam_sd.get_fdata(), item["pred_sd"][0], rtol=1e-6)
    # CBF is linear in deltaM per voxel: CBF SD / deltaM SD = enhanced CBF / enhanced deltaM
    cbf = nib.load(perf / "sub-01_desc-enhanced_cbf.nii.gz").get_fdata()
    deltam = nib.load(perf / "sub-01_desc-enhanced_deltam.nii.gz").get_fdata()
    inside = (cbf != 0) & (np.abs(deltam) > 1e-3 * np.abs(deltam).max())
    assert inside.sum() > 100
    np.testing.assert_allclose(
        cbf_sd.get_fdata()[inside] / deltam_sd.get_fdata()[inside], np.abs(cbf / deltam)[inside], rtol=1e-4
    )
    for kind, units in (("deltam", "same as control - label of the source series"), ("cbf", "mL/100 g/min")):
        sidecar = json.loads((perf / f"sub-01_desc-enhancedsd_{kind}.json").read_text())
        assert sidecar["Units"] == units and "standard deviation" in sidecar["Description"]
        assert sidecar["NumPairsUsed"] == 2 and sidecar["PairsUsed"] == [1, 2]
        assert sidecar["UncertaintySettings"]["calibration"] and sidecar["UncertaintyAssumptions"]
        assert sidecar["Sources"][0] == "bids::sub-01/perf/sub-01_desc-enhanced_deltam.nii.gz"
    enhanced = json.loads((perf / "sub-01_desc-enhanced_deltam.json").read_text())
    assert enhanced["UncertaintyMap"] == "sub-01_desc-enhancedsd_deltam.nii.gz"
    assert "sub-01_desc-enhancedsd_deltam.nii.gz" in enhanced.get("SeriesOutputs", [])


def test_writer_says_why_a_single_pair_has_no_map(tmp_path, dataset):
    item = _items(dataset, 1)[0]
    item["pred_sd_note"] = unc.SINGLE_PAIR_REASON
    out = tmp_path / "out"
    ASLOutputWriter(str(out), write_cbf=True, write_qc=False).write_series(item)
    perf = out / "sub-01" / "perf"
    assert not list(perf.glob("*enhancedsd*"))
    sidecar = json.loads((perf / "sub-01_desc-enhanced_deltam.json").read_text())
    assert sidecar["UncertaintyMapNotWrittenReason"] == unc.SINGLE_PAIR_REASON


def test_qc_figure_gains_the_uncertainty_rows(tmp_path):
    rng = np.random.default_rng(0)
    maps = {"2-pair mean": rng.normal(size=SHAPE), "enhanced": rng.normal(size=SHAPE)}
    plain = mpimg.imread(write_qc_figure(tmp_path / "a.png", "t", maps))
    sd = {"deltaM SD": np.abs(rng.normal(size=SHAPE)), "CBF SD": np.abs(rng.normal(size=SHAPE))}
    with_sd = mpimg.imread(write_qc_figure(tmp_path / "b.png", "t", maps, uncertainty=sd))
    assert with_sd.shape[0] > plain.shape[0] + 200  # two more rows of 2 inches at 90 dpi


def test_evaluation_scores_coverage_against_the_unused_pairs():
    rng = np.random.default_rng(0)
    shape = (16, 16, 6)
    reference = np.zeros(shape, np.float32)
    ref_var = np.full(shape, 0.5, np.float32)
    sd = np.full(shape, np.sqrt(1.5), np.float32)
    # error vs the reference = enhanced error (var 1.5) + reference noise (var 0.5): z ~ N(0, 1)
    estimate = rng.normal(0.0, np.sqrt(2.0), shape).astype(np.float32)
    mask = np.ones(shape, bool)
    scores = sd_scores({"pred_sd": sd[None]}, estimate, reference, ref_var, mask)
    assert scores["sd_coverage_95"] == pytest.approx(0.95, abs=0.02)
    assert scores["sd_mean_z2"] == pytest.approx(1.0, abs=0.1)
    assert sd_scores({}, estimate, reference, ref_var, mask) == {}
    assert {"sd_coverage_95", "sd_mean_z2"} <= set(EVALUATION_COLUMNS)


def test_evaluation_writer_rows_carry_the_sd_columns(tmp_path, dataset):
    chain = [LoadASLSeriesd("asl"), SelectPairsd("pairs", num_input_pairs=2, mode="groups", target="other")]
    items = chain[1](chain[0](find_asl_series(dataset)[0]))
    writer = ASLEvaluationWriter(str(tmp_path), methods=("enhanced", "mean"))
    for it in items:
        it = NormalizeASLd()(it)
        it["pred"] = it["input_mean"][None]
        it["pred_sd"] = np.full((1, *SHAPE), 1e3, np.float32)  # huge: every voxel covered
        writer.rows += writer.score_series(it)
    writer.write()
    rows = {r["method"]: r for r in writer.series_rows()}
    assert rows["enhanced"]["sd_coverage_95"] == 1.0 and rows["enhanced"]["sd_mean_z2"] < 1e-3
    assert "sd_coverage_95" not in rows["mean"]
    text = (tmp_path / "evaluation.csv").read_text().splitlines()
    assert "sd_coverage_95" in text[0]


def test_calibration_scores_and_multi_pld_restriction():
    from asl_bench import calibration
    from asl_bench.core import Series

    rng = np.random.default_rng(0)
    error = rng.normal(0.0, 2.0, 20000)
    scores = calibration.interval_scores(error, np.full(error.size, np.sqrt(3.0)), np.full(error.size, 1.0))
    assert scores["coverage"] == pytest.approx(0.95, abs=0.01) and scores["mean_z2"] == pytest.approx(1.0, abs=0.05)
    rel = calibration.reliability(error, np.abs(rng.normal(2.0, 0.1, error.size)), np.zeros(error.size), bins=4)
    assert len(rel["predicted_rms"]) == 4 and all(o == pytest.approx(2.0, rel=0.1) for o in rel["observed_rms"])
    # a multi-PLD series keeps the pairs of its longest PLD; a single-PLD one is unchanged
    pairs = rng.normal(size=(6, *SHAPE)).astype(np.float32)
    sidecar = {"PostLabelingDelay": [0.5, 0.5, 1.5, 1.5] * 3}
    item = {
        "pairs": pairs,
        "sidecar_json": json.dumps(sidecar),
        "pair_volumes": json.dumps([[2 * i, 2 * i + 1] for i in range(6)]),
        "guide": np.ones(SHAPE, np.float32),
        "guide_source": "control",
    }
    series = Series("s", item, (3.0, 3.0, 5.0), np.ones(SHAPE, bool))
    assert calibration.pair_plds(series) == [0.5, 1.5, 0.5, 1.5, 0.5, 1.5]
    one = calibration.single_pld(series)
    assert one.num_pairs == 3 and one.extra["pld"] == 1.5
    np.testing.assert_array_equal(one.item["pairs"], pairs[[1, 3, 5]])
    single = Series(
        "t", dict(item, sidecar_json=json.dumps({"PostLabelingDelay": 1.8})), (3.0,) * 3, np.ones(SHAPE, bool)
    )
    assert calibration.single_pld(single) is single


def test_joint_calibration_fit_adds_the_reference_variance_and_weighs_data_sets_equally():
    """The fit recovers (a, b) when the errors' variance is a^2 raw^2 + b^2 head^2 + the reference's
    variance; a real set with a 10x larger voxel count does not outweigh the simulated one."""
    from asl_bench import calibration

    rng = np.random.default_rng(1)

    def inputs(n: int, a: float, b: float, ref: float) -> list[dict]:
        raw, head = np.abs(rng.normal(1.0, 0.5, n)), np.full(n, 0.8)
        sd = np.sqrt(a * a * raw**2 + b * b * head**2 + ref)
        return [{"series": "x", "error": rng.normal(0.0, sd), "raw": raw, "head": head, "ref_var": np.full(n, ref)}]

    real = inputs(40000, 1.5, 0.5, 2.0)
    a, b = calibration.fit_ab(*(real[0][key] for key in ("error", "raw", "head", "ref_var")))
    assert a == pytest.approx(1.5, rel=0.05) and b == pytest.approx(0.5, abs=0.15)
    a_joint, _ = calibration.fit_inputs(inputs(4000, 1.0, 0.5, 0.0), real)
    assert 1.1 < a_joint < 1.4  # between the two sets' own factors, not pulled to the larger one
    scores = calibration.calibrated_scores(real, 1.5, 0.5)
    assert scores["coverage"] == pytest.approx(0.95, abs=0.01)


@pytest.mark.slow
def test_bundle_runs_write_sd_maps_and_score_them(tmp_path):
    """inference.json writes the SD maps of a k = 2 series and of a k = 1 series (that one says it is
    assumed), and the evaluate.json overlay fills the coverage columns of evaluation.csv, through
    monai.bundle run."""
    from helpers import EVALUATE, bundle_run, write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", 1, SHAPE, num_pairs=5)
    for k in ("2", "1"):
        out = tmp_path / f"out{k}"
        result = bundle_run("inference.json", "--dataset_dir", str(data), "--output_dir", str(out), "--num_pairs", k)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    perf2, perf1 = (tmp_path / f"out{k}" / "sub-00" / "perf" for k in ("2", "1"))
    assert (perf2 / "sub-00_desc-enhancedsd_deltam.nii.gz").exists()
    assert (perf2 / "sub-00_desc-enhancedsd_cbf.nii.gz").exists()
    assumptions = json.loads((perf1 / "sub-00_desc-enhancedsd_deltam.json").read_text())["UncertaintyAssumptions"]
    assert "ASSUMED" in assumptions[0]
    result = bundle_run(EVALUATE, "--dataset_dir", str(data), "--output_dir", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = (tmp_path / "eval" / "evaluation.csv").read_text().splitlines()
    header = rows[0].split(",")
    enhanced = [r.split(",") for r in rows[1:] if r.split(",")[1] == "enhanced"]
    assert enhanced and all(0.0 <= float(r[header.index("sd_coverage_95")]) <= 1.0 for r in enhanced)
