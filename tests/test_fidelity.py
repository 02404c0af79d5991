"""Fidelity measurements (asl_bench.fidelity, issue 17) on small synthetic volumes."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from asl_enhance.smoothing import gaussian_smooth

import asl_bench.core as core
import asl_bench.fidelity as fd
from asl_bench.cli import write_csv

VOXEL = (3.0, 3.0, 3.0)


def _head(shape, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [(n - 1) / 2 for n in shape]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def _perfusion(shape, head, rng) -> np.ndarray:
    return (head * (1.0 + 0.3 * gaussian_smooth(rng.normal(size=shape), 2.0))).astype(np.float32)


def test_planting_keeps_each_pairs_noise():
    rng = np.random.default_rng(0)
    shape = (24, 24, 16)
    mean = _perfusion(shape, np.ones(shape, bool), rng)
    pairs = (mean[None] + rng.normal(scale=0.5, size=(6, *shape))).astype(np.float32)
    spec, centre = fd.LesionSpec("hypo", 0.2, 4.0), (12, 12, 8)
    planted = fd.plant_lesions(pairs, [(spec, centre)], VOXEL)
    d = fd.scaled_distance(shape, centre, VOXEL)
    outside = d >= spec.radius + fd.EDGE / 2
    np.testing.assert_array_equal(planted[:, outside], pairs[:, outside])  # untouched
    inside = d <= spec.radius - fd.EDGE / 2
    noise_before = pairs - pairs.mean(axis=0)
    noise_after = planted - planted.mean(axis=0)
    np.testing.assert_allclose(noise_after, noise_before, atol=1e-5)  # every pair keeps its own noise
    all_mean = pairs.mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(planted.mean(axis=0)[inside], 0.2 * all_mean[inside], rtol=1e-4, atol=1e-5)
    ramp = ~outside & ~inside
    gain = planted.mean(axis=0)[ramp] / all_mean[ramp]
    assert np.all((gain > 0.2 - 1e-4) & (gain < 1 + 1e-4))  # soft edge between


def test_contrast_recovery_of_truth_is_one_and_of_a_constant_map_zero():
    rng = np.random.default_rng(1)
    shape = (56, 56, 30)
    head = _head(shape, (26, 26, 14))
    mean = _perfusion(shape, head, rng)
    lesions = fd.place_lesions(mean, head, VOXEL, fd.LESIONS, 2, rng)
    assert {spec for spec, _ in lesions} == set(fd.LESIONS)
    truth = fd.plant_lesions(mean[None], lesions, VOXEL)[0]
    regions = [fd.lesion_regions(shape, c, spec, VOXEL, head) for spec, c in lesions]
    assert fd.contrast_recovery(truth, truth, regions) == pytest.approx(1.0)
    assert fd.contrast_recovery(np.full(shape, 2.5), truth, regions) == pytest.approx(0.0, abs=1e-12)
    blurred = gaussian_smooth(truth, 3.0)
    assert fd.contrast_recovery(blurred, truth, regions[:1]) < 0.9  # a wide blur loses contrast
    for spec, c in lesions:  # every lesion and its shell inside the head, lesions apart
        core_mask, shell = fd.lesion_regions(shape, c, spec, VOXEL, np.ones(shape, bool))
        assert head[core_mask | shell].all()
        for other, c2 in lesions:
            if c2 != c:
                dist = np.sqrt(np.sum((np.subtract(c, c2) * 1.0) ** 2))
                assert dist >= fd.outer_radius(spec) + fd.outer_radius(other) + fd.GAP


def test_structure_removed_identity_zero_and_zero_output_one():
    rng = np.random.default_rng(2)
    ref = rng.uniform(0.5, 2.0, (10, 10, 5))
    mask = np.ones(ref.shape, bool)
    assert fd.structure_removed(ref, ref, ref, mask) == pytest.approx(0.0)
    assert fd.structure_removed(ref, np.zeros_like(ref), ref, mask) == pytest.approx(1.0)
    noisy = ref + rng.normal(scale=0.3, size=ref.shape)
    assert fd.structure_removed(noisy, noisy, ref, mask) == 0.0
    var = np.full(ref.shape, 0.01)  # the reference's noise energy is taken off its energy
    expected = np.sum(ref**2) / (np.sum(ref**2) - var.sum())
    assert fd.structure_removed(ref, np.zeros_like(ref), ref, mask, var) == pytest.approx(expected)


def test_tissue_ratio_of_a_scaled_map_is_unchanged():
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.5, 2.0, (12, 12, 6))
    head = np.ones(ref.shape, bool)
    gm, wm = fd.quantile_masks(ref, head)
    assert gm.any() and wm.any() and not (gm & wm).any()
    assert fd.tissue_ratio(ref, gm, wm) > 1.0
    assert fd.tissue_ratio_rel(3.0 * ref, ref, gm, wm) == pytest.approx(1.0)
    assert fd.tissue_ratio_rel(gaussian_smooth(ref, 2.0), ref, gm, wm) < 0.95


def test_no_harm_flags_a_blurred_clean_input():
    shape = (32, 32, 8)
    clean = np.full(shape, 20.0, np.float32)
    gm = np.zeros(shape, bool)
    gm[::6] = gm[1::6] = True  # thin cortical ribbons
    clean[gm] = 60.0
    wm = ~gm
    ok = fd.no_harm(clean, clean * 1.01, gm, wm)
    assert ok["noharm_ok"] == 1.0 and ok["noharm_gm_change"] == pytest.approx(0.01, rel=1e-4)
    harmed = fd.no_harm(clean, gaussian_smooth(clean, (2.0, 2.0, 0.0)), gm, wm)
    assert harmed["noharm_ok"] == 0.0
    assert harmed["noharm_gm_change"] < -0.05 and harmed["noharm_wm_change"] > 0.05


def test_null_checks_and_simulated_lesion_regions():
    rng = np.random.default_rng(4)
    shape = (20, 20, 10)
    head = np.ones(shape, bool)
    guide = rng.uniform(0.5, 1.5, shape)
    perfusion = 2.0 * guide
    checks = fd.null_checks(0.1 * guide, guide, perfusion, head)
    assert checks["null_head_mean"] == pytest.approx(0.05)
    assert checks["null_corr_anatomy"] == pytest.approx(1.0) and checks["null_corr_perfusion"] == pytest.approx(1.0)
    assert math.isnan(fd.null_checks(np.zeros(shape), guide, perfusion, head)["null_corr_anatomy"])
    lesion = fd.scaled_distance(shape, (10, 10, 5), VOXEL) <= 4.0
    core_mask, shell = fd.sim_lesion_regions(lesion, head, VOXEL)
    assert core_mask.any() and shell.any() and not (shell & lesion).any() and lesion[core_mask].all()
    assert fd.sim_lesion_regions(np.zeros(shape, bool), head, VOXEL) is None


def _series(pairs: np.ndarray, head: np.ndarray, sidecar: dict | None = None, volumes=None) -> core.Series:
    item = {
        "pairs": pairs.astype(np.float32),
        "guide": np.where(head, 1.0, 0.05).astype(np.float32),
        "guide_source": "m0",
        "sidecar_json": json.dumps(sidecar or {}),
        "pair_volumes": json.dumps(volumes or [[2 * i, 2 * i + 1] for i in range(pairs.shape[0])]),
    }
    s = core.Series("synthetic/sub-01", item, VOXEL, head)
    s.brain = core.prepare(s, list(range(s.num_pairs)))["mask"][0] > 0.5
    return s


def test_longest_pld_block_keeps_one_pld():
    shape = (8, 8, 4)
    head = np.ones(shape, bool)
    pairs = np.stack([np.full(shape, float(i + 1)) for i in range(6)])
    pld = [0.5, 0.5, 1.0, 1.0, 1.5, 1.5] * 2  # pair i uses volumes 2i, 2i + 1
    s = _series(pairs, head, {"PostLabelingDelay": pld})
    reduced, note = fd.longest_pld_block(s)
    np.testing.assert_array_equal(reduced.item["pairs"][:, 0, 0, 0], [3.0, 6.0])
    assert "longest PLD" in note and s.num_pairs == 6
    same, note = fd.longest_pld_block(_series(pairs, head, {"PostLabelingDelay": 1.8}))
    assert same.num_pairs == 6 and note == ""


def _tuned(ks) -> dict:
    params = {"gaussian": {"inplane": 1.0, "through": 1.0}, "guided": {"radius": 2, "eps": 0.1}, "nlm": {}, "bm3d": {}}
    return {k: {"params": params, "best": "gaussian"} for k in ks}


def test_evaluate_real_rows_on_a_noise_free_series(tmp_path):
    """Identical pairs: the k-pair mean recovers every lesion, removes nothing and does no harm; the
    rows carry the fidelity columns; the summary and the CSV keep the benchmark's own columns."""
    rng = np.random.default_rng(5)
    shape = (56, 56, 30)
    head = _head(shape, (26, 26, 14))
    mean = _perfusion(shape, head, rng)
    s = _series(np.repeat(mean[None], 6, axis=0), head)
    run = core.Run()
    opts = fd.Options(ks=(1, 2), groups=1, per_type=1, slow=False)
    placed = fd.evaluate_real([s], _tuned((1, 2)), [], opts, run, lambda msg: None)
    assert placed[s.name][0]["lesions"]
    rows = {(r["dataset"], r["k"], r["method"]): r for r in run.rows}
    mean_row = rows[("fidelity_real", 2, "mean_k")]
    for spec in fd.LESIONS:
        assert mean_row[f"cr_{spec.name}"] == pytest.approx(1.0, abs=1e-4)
    assert mean_row["structure_removed"] == pytest.approx(0.0, abs=1e-6)
    assert mean_row["gm_wm_ratio_rel"] == pytest.approx(1.0)
    assert (
        rows[("fidelity_real", 2, "gauss_3")]["cr_hypo_r2.5"] < rows[("fidelity_real", 2, "gauss_0.5")]["cr_hypo_r2.5"]
    )
    assert rows[("fidelity_real", 2, "gauss_3")]["structure_removed"] > 0.01
    assert rows[("noharm_real", 6, "mean_k")]["noharm_ok"] == 1.0
    assert rows[("noharm_real", 6, "gauss_3")]["noharm_ok"] == 0.0
    assert "null_head_mean" in mean_row and ("fidelity_real", 1, "gaussian_self") not in rows
    summary = core.summarise(run.rows, _tuned((1, 2)))
    assert {"cr_hypo_r5", "ratio_to_mean_k", "nmse_corrected"} <= set(summary[0])
    bench_row = {"dataset": "test", "series": "x", "k": 2, "group": "0-1", "method": "mean_k", "nmse_truth": 0.5}
    write_csv(tmp_path / "b.csv", [bench_row, *run.rows])
    header = next(csv.reader(open(tmp_path / "b.csv")))
    assert header[: len(bench_row)] == list(bench_row) and "cr_hypo_r5" in header
    first = next(csv.DictReader(open(tmp_path / "b.csv")))
    assert first["cr_hypo_r5"] == "" and first["nmse_truth"] == "0.5"
    assert "k = 2, real long scans" in fd.tables(run.rows, (1, 2), [])
    fd.figure(run.rows, tmp_path / "fidelity.png", (1, 2), [])
    assert (tmp_path / "fidelity.png").stat().st_size > 0


def test_lesion_columns_are_benchmark_columns():
    assert all(f"cr_{spec.name}" in core.FIDELITY_COLUMNS for spec in fd.LESIONS)
    assert core.primary("fidelity_real") == "nmse_corrected" and core.primary("fidelity_sim") == "nmse_truth"
    assert core.primary("real") == "nmse_corrected" and core.primary("test") == "nmse_truth"


def test_fingerprint_tells_models_apart_by_their_fixed_kernels():
    """Two models that differ only in a fixed (non-persistent) blur kernel are two models: before, the
    fingerprint hashed the state dict alone and the benchmark scored the second as a copy of the first."""
    import torch
    from asl_enhance.layout import InputLayout
    from asl_enhance.networks import ScaleMixingEnhancer

    layout = InputLayout()
    torch.manual_seed(0)
    base = ScaleMixingEnhancer(layout, restore_sigma=[1.5, 1.5, 0.75])
    wider = ScaleMixingEnhancer(layout, restore_sigma=[3.0, 3.0, 1.5])
    wider.load_state_dict(base.state_dict())
    same = ScaleMixingEnhancer(layout, restore_sigma=[1.5, 1.5, 0.75])
    same.load_state_dict(base.state_dict())
    prints = [fd.fingerprint(core.Model(str(i), net, layout, "")) for i, net in enumerate((base, wider, same))]
    assert prints[0] != prints[1] and prints[0] == prints[2]
