"""QC figure and the inference writer's CBF outputs: files, units, sidecars, BIDS derivative marker,
tissue table. The writer is fed items built by the bundle's own transforms (no network needed)."""

from __future__ import annotations

import csv
import json
import math
import re

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from asl_enhance.bids import find_asl_series
from asl_enhance.qc import representative_slices, write_qc_figure
from asl_enhance.smoothing import gaussian_smooth
from asl_enhance.transforms import LoadASLSeriesd, NormalizeASLd, SelectPairsd
from asl_enhance.writers import TISSUE_COLUMNS, ASLOutputWriter, unused_pairs_line
from helpers import AFFINE, phantom_series, write_series

SHAPE = (20, 18, 8)


def test_representative_slices_inside_the_mask():
    mask = np.zeros((4, 4, 20), bool)
    mask[..., 4:16] = True
    slices = representative_slices(mask, 5)
    assert len(slices) == 5 and all(4 <= z <= 15 for z in slices) and slices == sorted(slices)
    assert representative_slices(np.ones((3, 3, 1), bool)) == [0]


def test_qc_figure_written_atomically(tmp_path):
    rng = np.random.default_rng(0)
    maps = {"2-pair mean": rng.normal(size=SHAPE), "enhanced": rng.normal(size=SHAPE)}
    path = write_qc_figure(tmp_path / "sub-01_qc.png", "sub-01: 2 of 6 pairs", maps, {"cbf": np.ones(SHAPE)})
    image = mpimg.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 300
    assert [p.name for p in tmp_path.iterdir()] == ["sub-01_qc.png"]  # no temporary left behind


def test_noise_twin_row_sits_under_the_change_row(tmp_path):
    """Given the input's noise twin, the figure gains one row (same scale as the change row), so a
    reader can compare what the model removed with what noise looks like."""
    rng = np.random.default_rng(1)
    maps = {"2-pair mean": rng.normal(size=SHAPE), "enhanced": rng.normal(size=SHAPE)}
    plain = mpimg.imread(write_qc_figure(tmp_path / "a_qc.png", "a", maps))
    with_twin = mpimg.imread(write_qc_figure(tmp_path / "b_qc.png", "b", maps, noise=rng.normal(size=SHAPE)))
    assert with_twin.shape[1] == plain.shape[1] and with_twin.shape[0] > plain.shape[0] + 100


def _items(root, num_pairs):
    chain = [LoadASLSeriesd("asl", num_pairs=num_pairs), SelectPairsd("pairs"), NormalizeASLd()]
    items = []
    for item in find_asl_series(root):
        for transform in chain:
            item = transform(item)
        item["pred"] = item["input_mean"] * 0.5 + 0.5 * item["pairs"].mean(axis=0)  # a stand-in "network"
        items.append(item)
    return items


@pytest.fixture()
def dataset(tmp_path):
    """A PCASL series with included M0 and tissue maps beside it, and one with M0Type Absent."""
    volumes, types, deltam = phantom_series(SHAPE, num_pairs=6, seed=1)
    asl = write_series(tmp_path / "data" / "sub-01" / "perf", "sub-01", volumes, types)
    gm = (deltam > np.percentile(deltam[deltam > 0], 50)).astype(np.float32)
    wm = ((deltam > 0) & (gm == 0)).astype(np.float32)
    for name, prob in (("GM", gm), ("WM", wm)):
        nib.save(nib.Nifti1Image(prob, AFFINE), asl.parent / f"sub-01_label-{name}_probseg.nii.gz")
    write_series(tmp_path / "data" / "sub-02" / "perf", "sub-02", volumes[..., 1:], types[1:])
    return tmp_path / "data", deltam


def test_writer_outputs_cbf_qc_and_derivative_files(tmp_path, dataset):
    root, deltam = dataset
    out = tmp_path / "out"
    writer = ASLOutputWriter(str(out), bundle_version="9.9.9", write_cbf=True, write_qc=True)
    for item in _items(root, num_pairs=2):
        writer.write_series(item)
    writer.write_dataset_files()
    perf = out / "sub-01" / "perf"
    for desc in ("enhanced", "mean"):
        image = nib.load(perf / f"sub-01_desc-{desc}_cbf.nii.gz")
        assert image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, AFFINE)
        sidecar = json.loads((perf / f"sub-01_desc-{desc}_cbf.json").read_text())
        assert sidecar["Units"] == "mL/100 g/min" and sidecar["NumPairsUsed"] == 2  # BIDS/ASLPrep spelling
        assert sidecar["ParameterSources"]["PostLabelingDelay"] == "sidecar"
        assert sidecar["ParameterSources"]["LabelingEfficiency"] == "default"
    # CBF of the written mean deltaM and the series' M0 volume, by hand (3 T PCASL, PLD = tau = 1.8 s)
    cbf = np.asarray(nib.load(perf / "sub-01_desc-mean_cbf.nii.gz").dataobj)
    mean = np.asarray(nib.load(perf / "sub-01_desc-mean_deltam.nii.gz").dataobj, np.float64)
    m0 = np.asarray(nib.load(root / "sub-01" / "perf" / "sub-01_asl.nii.gz").dataobj, np.float64)[..., 0]
    expected = 6000 * 0.9 * mean * math.exp(1.8 / 1.65) / (2 * 0.85 * 1.65 * m0 * (1 - math.exp(-1.8 / 1.65)))
    inside = deltam > 0
    np.testing.assert_allclose(cbf[inside], expected[inside], rtol=1e-4)
    assert 40 < np.median(cbf[inside]) < 130  # phantom deltaM is ~1 % of M0: ~86 ml/100g/min
    assert (perf / "sub-01_qc.png").exists()
    deltam_sidecar = json.loads((perf / "sub-01_desc-mean_deltam.json").read_text())
    assert deltam_sidecar["CBFWritten"] is True
    # M0Type Absent: deltaM only, the sidecar says why, the QC figure still exists
    perf2 = out / "sub-02" / "perf"
    assert not list(perf2.glob("*_cbf.nii.gz")) and (perf2 / "sub-02_qc.png").exists()
    reason = json.loads((perf2 / "sub-02_desc-enhanced_deltam.json").read_text())["CBFNotComputedReason"]
    assert "Absent" in reason
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0] == {**description["GeneratedBy"][0], "Name": "asl_bundle", "Version": "9.9.9"}
    with open(out / "cbf_tissue.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert tuple(rows[0]) == TISSUE_COLUMNS
    assert {r["method"] for r in rows} == {"enhanced", "mean", "all_pairs_mean"}
    assert {(r["series"], r["tissue_source"]) for r in rows} == {("sub-01/perf/sub-01", "segmentation (beside input)")}
    assert all(float(r["gm_cbf_median"]) > float(r["wm_cbf_median"]) > 0 for r in rows)


def test_all_pair_row_only_when_pairs_were_left_out(tmp_path, dataset):
    root, _ = dataset
    heights = {}
    for num_pairs in (2, None):
        out = tmp_path / f"out{num_pairs}"
        writer = ASLOutputWriter(str(out), write_cbf=True, write_qc=True)
        writer.write_series(_items(root, num_pairs)[0])
        heights[num_pairs] = mpimg.imread(out / "sub-01" / "perf" / "sub-01_qc.png").shape[0]
    assert heights[2] > heights[None]  # an extra deltaM and an extra CBF row


def test_simulation_truth_is_a_reference_row_and_a_tissue_row(tmp_path, dataset, caplog):
    """A data set with the simulator's noise-free deltaM (derivatives/simulation, as asl-simulate writes it,
    the quickstart's): the QC figure and cbf_tissue.tsv show it beside the maps; on another grid it is left out."""
    root, deltam = dataset
    truth_dir = root / "derivatives" / "simulation" / "sub-01" / "perf"
    truth_dir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(deltam.astype(np.float32), AFFINE), truth_dir / "sub-01_desc-truth_deltam.nii.gz")
    heights = {}
    for case in ("with", "other grid"):
        if case == "other grid":
            small = nib.Nifti1Image(deltam[:-2].astype(np.float32), AFFINE)
            nib.save(small, truth_dir / "sub-01_desc-truth_deltam.nii.gz")
        out = tmp_path / case
        writer = ASLOutputWriter(str(out), write_cbf=True, write_qc=True)
        writer.write_series(_items(root, num_pairs=2)[0])
        writer.write_dataset_files()
        with open(out / "cbf_tissue.tsv", newline="") as f:
            rows = {r["method"]: r for r in csv.DictReader(f, delimiter="\t")}
        heights[case] = mpimg.imread(out / "sub-01" / "perf" / "sub-01_qc.png").shape[0]
        if case == "with":
            assert set(rows) == {"enhanced", "mean", "all_pairs_mean", "truth"}
            # the truth is the phantom's deltaM: its GM CBF is the noise-free one, near the all-pair mean's
            truth_gm, all_gm = float(rows["truth"]["gm_cbf_mean"]), float(rows["all_pairs_mean"]["gm_cbf_mean"])
            assert truth_gm == pytest.approx(all_gm, rel=0.1)
        else:
            assert "truth" not in rows and "no truth row" in caplog.text
    assert heights["with"] > heights["other grid"]  # an extra deltaM and an extra CBF row


def test_enhanced_sidecar_says_when_the_pairs_show_no_perfusion(tmp_path, dataset, caplog):
    """At k >= 2 the enhanced deltaM's sidecar gives S (the input over its noise twin at the restore's coarsest
    band); a series whose 2 pairs differ by noise alone gets a note and a logged warning, which says what the
    map then is with the scan test off (the default) and on."""
    root, _ = dataset
    volumes, types, _ = phantom_series(SHAPE, num_pairs=4, seed=3)
    rng = np.random.default_rng(8)
    for c in [i for i, t in enumerate(types) if t == "control"]:
        volumes[..., c + 1] = volumes[..., c] + rng.normal(0, 4.0, SHAPE)  # label = control + noise
    write_series(root / "sub-03" / "perf", "sub-03", volumes, types)
    settings = {"restore_bands": [[2.5, 2.5, 1.25], [0, 0, 0]], "restore_scan_test": 0.0}
    writer = ASLOutputWriter(str(tmp_path / "out"), write_cbf=False, write_qc=False, settings=settings)
    for item in _items(root, num_pairs=2):
        writer.write_series(item)

    def sidecar(subject: str) -> dict:
        return json.loads((tmp_path / "out" / subject / "perf" / f"{subject}_desc-enhanced_deltam.json").read_text())

    perfused, flat = sidecar("sub-01"), sidecar("sub-03")
    assert perfused["InputPerfusionToNoise"] > 4 and "InputPerfusionNote" not in perfused
    assert flat["InputPerfusionToNoise"] < 2 and "no perfusion above their noise" in flat["InputPerfusionNote"]
    assert "sub-03: the 2 pairs used show no perfusion" in caplog.text and "--restore_scan_test 4" in caplog.text
    on = ASLOutputWriter(
        str(tmp_path / "on"), write_cbf=False, write_qc=False, settings={**settings, "restore_scan_test": 4}
    )
    on.write_series(_items(root, num_pairs=2)[-1])
    note = json.loads(next((tmp_path / "on").rglob("sub-03_desc-enhanced_deltam.json")).read_text())
    assert "leans on a blur the network chose" in note["InputPerfusionNote"]
    single = ASLOutputWriter(str(tmp_path / "one"), write_cbf=False, write_qc=False, settings=settings)
    single.write_series(_items(root, num_pairs=1)[0])  # one pair: no twin, no S
    assert "InputPerfusionToNoise" not in json.loads(
        next((tmp_path / "one").rglob("*enhanced_deltam.json")).read_text()
    )


def test_writer_without_cbf_or_qc(tmp_path, dataset):
    root, _ = dataset
    writer = ASLOutputWriter(str(tmp_path / "out"), write_cbf=False, write_qc=False)
    writer.write_series(_items(root, 2)[0])
    names = sorted(p.name for p in (tmp_path / "out" / "sub-01" / "perf").iterdir())
    assert names == [f"sub-01_desc-{d}_deltam.{e}" for d in ("enhanced", "mean") for e in ("json", "nii.gz")]


def test_title_says_what_the_map_kept_against_the_unused_pairs():
    """A long scan's QC title: error, GM/WM-like contrast and pattern taken out, against the unused pairs."""
    rng = np.random.default_rng(7)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (32, 32, 10)], indexing="ij")
    head = (x**2 + y**2 + 0.5 * z**2) < 0.8
    truth = head * (10.0 + 6.0 * np.sign(np.sin(6 * x) * np.sin(6 * y)))  # a fine GM/WM-like pattern
    pairs = (truth + rng.normal(0.0, 3.0, (10, *truth.shape))).astype(np.float32)
    item = {"input_pairs": "[0, 1]", "mask": head[None].astype(np.float32)}
    mean = pairs[:2].mean(0)
    same = unused_pairs_line(item, {"enhanced": mean, "mean": mean}, pairs)
    assert same.startswith("vs the 8 unused pairs: error") and "pattern taken out 0.00" in same
    blurred = unused_pairs_line(item, {"enhanced": gaussian_smooth(mean, (2.0, 2.0, 1.0)), "mean": mean}, pairs)
    contrast = [float(v) for v in re.findall(r"contrast ([\d.]+) of theirs \(([\d.]+)\)", blurred)[0]]
    assert contrast[0] < contrast[1] - 0.1  # the blur flattened the pattern the plain mean keeps
    assert float(blurred.rsplit(" ", 1)[1]) > 0.1  # and took part of it out
    assert unused_pairs_line({**item, "input_pairs": "[0, 1, 2, 3, 4, 5, 6, 7, 8]"}, {"enhanced": mean, "mean": mean},
                             pairs) == ""  # fmt: skip  # one unused pair: no noise estimate, no line
