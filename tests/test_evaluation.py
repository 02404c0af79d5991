"""Evaluation without clean data: disjoint input groups, the noise-corrected error against hand-computed
values (a 2-pair reference, where the correction matters), effective pairs of a K-pair mean, and the
columns of ``evaluation.csv`` from a real ``evaluate.json`` run (fresh weights, never model.pt)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from asl_enhance import metrics
from asl_enhance.bids import find_asl_series
from asl_enhance.evaluation import ASLEvaluationWriter, FidelityScorer
from asl_enhance.fidelity import LESIONS
from asl_enhance.smoothing import gaussian_smooth
from asl_enhance.transforms import LoadASLSeriesd, PlantLesionsd, SelectPairsd
from helpers import EVALUATE, bundle_run, config_files, phantom_series, write_phantom_dataset, write_series
from monai.bundle import ConfigParser


def _pairs(*voxel_values: tuple[float, ...]) -> np.ndarray:
    """(P, V, 1, 1) pairs from per-pair voxel values."""
    return np.asarray(voxel_values, np.float32)[:, :, None, None]


def test_groups_are_disjoint_and_leave_two_reference_pairs():
    pairs = _pairs(*[(float(i), 0.0) for i in range(5)])
    items = SelectPairsd(num_input_pairs=2, mode="groups", target="other", max_groups=4)({"pairs": pairs})
    # 5 pairs, K = 2: groups [0, 1] and [2, 3] (a third would need pairs 4 and 5)
    assert [it["input_group"] for it in items] == [0, 1]
    assert [json.loads(it["input_pairs"]) for it in items] == [[0, 1], [2, 3]]
    np.testing.assert_allclose(items[0]["input_mean"][0, 0, 0], (0 + 1) / 2)
    np.testing.assert_allclose(items[0]["other_mean"][0, 0, 0], (2 + 3 + 4) / 3)
    np.testing.assert_allclose(items[1]["other_mean"][0, 0, 0], (0 + 1 + 4) / 3)
    # reference noise variance: sample variance of the reference pairs / their number
    np.testing.assert_allclose(items[1]["target_noise_var"][0, 0, 0], np.var([0, 1, 4], ddof=1) / 3, rtol=1e-6)
    # max_groups caps the count; K = 4 of 5 pairs would leave one reference pair, whose noise no spread
    # measures: refused, not scored uncorrected
    assert len(SelectPairsd(num_input_pairs=1, mode="groups", target="other", max_groups=3)({"pairs": pairs})) == 3
    assert len(SelectPairsd(num_input_pairs=3, mode="groups", target="other")({"pairs": pairs})) == 1
    with pytest.raises(Exception, match=r"needs at least 6 pairs \(4 as input, 2 unused"):
        SelectPairsd(num_input_pairs=4, mode="groups", target="other")({"pairs": pairs, "asl": "x"})


def test_failed_item_passes_through_as_one_item():
    pairs = _pairs((1.0, 2.0), (3.0, 4.0))
    out = SelectPairsd(num_input_pairs=2, mode="groups", target="other", on_error="skip")({"pairs": pairs, "asl": "x"})
    assert isinstance(out, dict) and "needs at least 4 pairs" in out["error"]
    with pytest.raises(Exception, match="needs at least 4 pairs"):
        SelectPairsd(num_input_pairs=2, mode="groups", target="other")({"pairs": pairs, "asl": "x"})


def test_corrected_error_hand_computed():
    # 3 pairs over 2 voxels; K = 1: input = pair 0, reference = pairs 1 and 2 (few pairs: correction matters)
    pairs = _pairs((4.0, 1.0), (3.0, 2.0), (1.0, 0.0))
    item = SelectPairsd(num_input_pairs=1, mode="groups", target="other", max_groups=1)({"pairs": pairs})[0]
    mask = np.ones((2, 1, 1), bool)
    # reference mean (2, 1); its noise variance: sample variances (2, 2) / 2 pairs = (1, 1)
    np.testing.assert_allclose(item["other_mean"].ravel(), [2.0, 1.0])
    np.testing.assert_allclose(item["target_noise_var"].ravel(), [1.0, 1.0])
    ref, ref_var = item["other_mean"], item["target_noise_var"]
    # plain: ((4-2)^2 + (1-1)^2) / (2^2 + 1^2) = 4/5
    assert metrics.nmse(item["input_mean"], ref, mask) == pytest.approx(4 / 5)
    # corrected: ((4 - 1) + (0 - 1)) / ((4 - 1) + (1 - 1)) = 2/3
    corrected = metrics.nmse_corrected(item["input_mean"], ref, ref_var, mask)
    assert corrected == pytest.approx(2 / 3)
    # single pair: variance over all 3 pairs, voxel 1: values 4, 3, 1 -> 7/3; voxel 2: 1, 2, 0 -> 1
    np.testing.assert_allclose(item["pair_noise_var"].ravel(), [7 / 3, 1.0], rtol=1e-6)
    single = metrics.per_pair_nmse(item["pair_noise_var"], ref, ref_var, mask)
    assert single == pytest.approx((7 / 3 + 1) / 3)
    assert metrics.effective_pairs(corrected, single) == pytest.approx((10 / 9) / (2 / 3))


def test_evaluation_table_is_kept_checked_and_never_header_only(tmp_path, capsys):
    """The command line's evaluation writer: an existing table is kept without --overwrite, an output
    folder inside the data set is refused (one line, status 2), and a run that scored nothing writes none."""
    data, out = tmp_path / "data", tmp_path / "eval"
    data.mkdir()
    writer = ASLEvaluationWriter(str(out), dataset_dir=str(data), overwrite=False)
    writer.write()  # every series failed
    assert not writer.path.exists() and "No series scored" in capsys.readouterr().out
    writer.path.write_text("series,method\n")
    for folder, overwrite, says in (
        (out, False, "exists (--overwrite true replaces it)"),
        (data / "x", True, "inside"),
    ):
        with pytest.raises(SystemExit) as exc:
            ASLEvaluationWriter(str(folder), dataset_dir=str(data), overwrite=overwrite)
        assert exc.value.code == 2 and says in capsys.readouterr().err
    ASLEvaluationWriter(str(out), dataset_dir=str(data), overwrite=True)  # replacing it was asked for


def test_series_row_is_median_over_groups():
    writer = ASLEvaluationWriter("/nonexistent", methods=("mean",))
    base = {
        "series": "s",
        "method": "mean",
        "num_pairs": 2,
        "total_pairs": 9,
        "num_groups": 1,
        "nmse_all": 0.0,
        "nmse_other": 0.0,
        "psnr": 0.0,
        "ssim": 0.0,
        "gaussian_sigma_mm": "",
    }
    for g, err in enumerate([0.1, 0.5, 0.2]):
        writer.rows.append({**base, "input_group": g, "nmse_corrected": err})
    # the series' own n-pair mean error curve (n = 1, 2, 4): effective pairs are read off it
    writer.curves["s"] = metrics.MeanErrorCurve((1, 2, 4), (0.8, 0.4, 0.2), (8, 4, 2))
    (row,) = writer.series_rows()
    assert row["num_groups"] == 3
    assert row["nmse_corrected"] == pytest.approx(0.2)  # median of 0.1, 0.5, 0.2
    assert row["effective_pairs"] == pytest.approx(4.0)  # where the curve reaches the median error
    assert row["effective_pairs_min"] == pytest.approx(0.8 / 0.5)  # the worst group, between n = 1 and 2
    assert row["effective_pairs_max"] == pytest.approx(8.0)  # the best group, 1/n beyond the curve


@pytest.mark.parametrize("k", [2, 4])
def test_effective_pairs_of_k_pair_mean_is_k(k):
    rng = np.random.default_rng(k)
    truth = 1.0 + rng.random((16, 16, 8)).astype(np.float32)
    pairs = truth + rng.normal(0.0, 2.0, (40, *truth.shape)).astype(np.float32)
    mask = np.ones(truth.shape, bool)
    items = SelectPairsd(num_input_pairs=k, mode="groups", target="other", max_groups=4)({"pairs": pairs})
    effective = []
    for it in items:
        err = metrics.nmse_corrected(it["input_mean"], it["other_mean"], it["target_noise_var"], mask)
        single = metrics.per_pair_nmse(it["pair_noise_var"], it["other_mean"], it["target_noise_var"], mask)
        effective.append(metrics.effective_pairs(err, single))
    assert len(items) == 4
    assert float(np.median(effective)) == pytest.approx(k, rel=0.15)


def _evaluation_run(tmp_path, configs, count: int, shape: tuple[int, ...], seed: int):
    """An evaluation overlay stack run by the bundle runner on phantom series with fresh weights (never
    model.pt): the finished process and the rows of its evaluation.csv."""
    data = tmp_path / "data"
    write_phantom_dataset(data, count, shape, num_pairs=6, first_seed=seed)
    torch.manual_seed(1)
    parser = ConfigParser()
    parser.read_config(config_files(EVALUATE))
    weights = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), weights)
    out = tmp_path / "eval"
    result = bundle_run(
        configs, "--dataset_dir", str(data), "--output_dir", str(out), "--handlers#0#load_path", str(weights),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "evaluation.csv", newline="") as f:
        return result, list(csv.DictReader(f))


@pytest.mark.slow
def test_evaluation_csv_columns(tmp_path):
    result, rows = _evaluation_run(tmp_path, EVALUATE, 2, (20, 18, 8), seed=10)
    assert {"series", "method", "num_pairs", "nmse_corrected", "effective_pairs", "num_groups"} <= set(rows[0])
    series = {str(Path(f"sub-{i:02d}") / "perf" / f"sub-{i:02d}") for i in range(2)}
    methods = {"enhanced", "mean", "gaussian"}
    assert {(r["series"], r["method"]) for r in rows} == {(s, m) for s in series | {"ALL"} for m in methods}
    assert len(rows) == 3 * len(methods)
    # 6 pairs, K = 2: three disjoint groups, each leaving 4 reference pairs
    assert {r["num_groups"] for r in rows if r["series"] != "ALL"} == {"3"}
    assert "Scored 2 series" in result.stdout and "effective pairs" in result.stdout
    assert "All 2 series done." in result.stdout
    # without planted lesions: fidelity beside the error, no contrast recovery
    assert all(r["structure_removed"] != "" and r["cr_hypo_r5"] == "" for r in rows)


# ------------------------------------------------------------------ planted lesions (evaluate_lesions.json)
LESIONS_OVERLAY = (*EVALUATE, "evaluate_lesions.json")


def _long_scan(shape=(56, 56, 18), num_pairs: int = 6, seed: int = 0) -> dict:
    """A loaded-series-like item: a head-sized ellipsoid of perfusion with noisy pairs, its M0 guide and affine."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (x**2 + y**2 + 0.6 * z**2) < 0.85
    perfusion = head * (10.0 + 4.0 * np.cos(3 * x) * np.sin(2 * y))
    pairs = (perfusion + rng.normal(0.0, 3.0, (num_pairs, *shape)) * head).astype(np.float32)
    affine = np.diag([3.0, 3.0, 4.0, 1.0])
    return {"pairs": pairs, "guide": (1000.0 * head).astype(np.float32), "affine": affine, "rel_dir": "sub-01/perf",
            "stem": "sub-01"}  # fmt: skip


def test_planted_lesions_keep_each_pairs_noise_and_repeat_per_series():
    item = _long_scan()
    out = PlantLesionsd(per_type=2, seed=0)(item)
    lesions = json.loads(out["lesions"])
    assert {name for name, *_ in lesions} == {spec.name for spec in LESIONS}
    assert len(LESIONS) <= len(lesions) <= 2 * len(LESIONS)  # at most per_type of each, where there is room
    before, after = item["pairs"], out["pairs"]
    # each pair keeps its own noise: its difference from the all-pair mean is unchanged
    np.testing.assert_allclose(after - after.mean(0), before - before.mean(0), atol=1e-4)
    # inside a large hypoperfusion lesion's core the all-pair mean drops to 20 % of what it was
    name, factor, radius, centre = next(lesion for lesion in lesions if lesion[0] == "hypo_r5")
    c = tuple(centre)
    assert after.mean(0)[c] == pytest.approx(factor * before.mean(0)[c], rel=1e-4)
    assert out["lesion_tissue"][c] == 1.0
    # the same series and seed meet the same lesions (a rerun, another model); another seed or series does not
    assert PlantLesionsd(per_type=2, seed=0)(item)["lesions"] == out["lesions"]
    assert PlantLesionsd(per_type=2, seed=1)(item)["lesions"] != out["lesions"]
    assert PlantLesionsd(per_type=2, seed=0)(dict(item, stem="sub-02"))["lesions"] != out["lesions"]
    # a series that failed to load passes through
    assert PlantLesionsd()({"error": "broken", "pairs": before})["pairs"] is before


def test_fidelity_scores_tell_a_kept_lesion_from_a_blurred_one():
    planted = PlantLesionsd(per_type=2, seed=3)(_long_scan(seed=3))
    pairs = planted["pairs"]
    truth = pairs.mean(0)
    scorer = FidelityScorer(planted, truth)
    reference, ref_var = pairs[2:].mean(0), pairs[2:].var(0, ddof=1) / 4
    kept = scorer(pairs[:2].mean(0), truth, reference, ref_var)
    assert all(kept[f"cr_{spec.name}"] == pytest.approx(1.0) for spec in LESIONS)
    blurred = scorer(pairs[:2].mean(0), gaussian_smooth(truth, (3.0, 3.0, 1.5)), reference, ref_var)
    assert blurred["cr_hypo_r2.5"] < 0.6 and blurred["cr_hypo_r5"] < kept["cr_hypo_r5"]
    assert blurred["gm_wm_ratio_rel"] < 0.95 < kept["gm_wm_ratio_rel"]
    # nothing taken out of the input: no structure removed; the blur takes some of the reference's pattern
    unchanged = scorer(pairs[:2].mean(0), pairs[:2].mean(0), reference, ref_var)
    assert unchanged["structure_removed"] == pytest.approx(0.0)
    assert blurred["structure_removed"] > 0.02
    # without planted lesions there are no CR scores
    assert "cr_hypo_r5" not in FidelityScorer(_long_scan(), truth)(truth, truth, reference, ref_var)


def test_lesion_overlay_inserts_planting_after_loading():
    parser = ConfigParser()
    parser.read_config(config_files(EVALUATE))
    plain = parser.get("preprocessing#transforms")
    parser.read_config(config_files(LESIONS_OVERLAY))
    assert parser.get("preprocessing#transforms") == [plain[0], "@plant_lesions", *plain[1:]]


@pytest.mark.slow
def test_lesion_overlay_scores_contrast_recovery(tmp_path):
    _, rows = _evaluation_run(tmp_path, LESIONS_OVERLAY, 1, (44, 44, 16), seed=4)
    assert {r["method"] for r in rows} == {"enhanced", "mean", "gaussian"}
    for row in rows:
        scores = [float(row[f"cr_{spec.name}"]) for spec in LESIONS]
        assert all(-0.5 < s < 2.0 for s in scores), row
    mean = next(r for r in rows if r["method"] == "mean" and r["series"] != "ALL")
    assert float(mean["structure_removed"]) == pytest.approx(0.0, abs=1e-6)


def test_evaluation_scores_a_multi_pld_series_at_its_longest_pld(tmp_path):
    """Before, consecutive pairs at the first PLD were scored against a reference of every PLD (a real
    Oxford run: error 2.3 for the enhanced map, 0.17 on its longest-PLD block)."""
    volumes, types, _ = phantom_series((12, 10, 6), num_pairs=6, seed=2, m0_volumes=1)
    plds = [0.0] + [p for p in (1.0, 1.0, 1.5, 1.5, 2.0, 2.0) for _ in range(2)]  # M0, then 3 PLDs x 2 pairs
    sidecar = {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": plds, "LabelingDuration": 1.8,
               "M0Type": "Included", "MagneticFieldStrength": 3, "BackgroundSuppression": False}  # fmt: skip
    write_series(tmp_path / "multi" / "sub-01" / "perf", "sub-01", volumes, types, sidecar)
    (item,) = find_asl_series(tmp_path / "multi")
    every = LoadASLSeriesd()(item)
    longest = LoadASLSeriesd(pld_block="longest")(item)
    assert every["pairs"].shape[0] == 6 and longest["pairs"].shape[0] == 2
    np.testing.assert_array_equal(longest["pairs"], every["pairs"][4:])
    assert json.loads(longest["pair_volumes"]) == json.loads(every["pair_volumes"])[4:]
    assert "longest PLD (2 s) of 6" in json.loads(longest["input_notes"])[-1]
    write_series(tmp_path / "single" / "sub-02" / "perf", "sub-02", volumes, types)  # one PLD: unchanged
    (single,) = find_asl_series(tmp_path / "single")
    assert LoadASLSeriesd(pld_block="longest")(single)["pairs"].shape[0] == 6
    parser = ConfigParser()
    parser.read_config(config_files(EVALUATE))
    assert parser.get("load_series#pld_block") == "longest"
