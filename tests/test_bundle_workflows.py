"""The bundle's configs: they parse and instantiate, and tiny train / evaluate / inference runs through
``python -m monai.bundle run`` write what the contract says. Weights are a freshly initialised network
(never the shipped model.pt)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from asl_enhance.bids import find_asl_series
from helpers import (
    AFFINE,
    BUNDLE,
    CONFIGS,
    EVALUATE,
    INPUT_CHANNELS,
    bundle_run,
    config_files,
    phantom_series,
    write_phantom_dataset,
    write_series,
)
from monai.bundle import ConfigParser

SHAPE = (20, 18, 8)
SCALE_C = 3.7


def _parser(config: str, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(EVALUATE if config == "evaluate.json" else config))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"bundle_root": str(BUNDLE), **override})
    return parser


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A freshly initialised network's state_dict, loaded through ``--handlers#0#load_path``."""
    torch.manual_seed(1)
    net = _parser("inference.json").get_parsed_content("network_def")
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    write_phantom_dataset(root, 5, SHAPE, num_pairs=5, first_seed=0, alternate_order=True)
    return root


# ------------------------------------------------------------------------------------------ parsing


def test_shipped_weights_load_strictly_into_every_config():
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    for config in ("train.json", "evaluate.json", "inference.json"):
        _parser(config).get_parsed_content("network_def").load_state_dict(state, strict=True)


@pytest.mark.parametrize("config", ["train.json", "evaluate.json", "inference.json"])
def test_config_parses_and_instantiates(config, train_data, tmp_path):
    overrides = {"dataset_dir": str(train_data), "output_dir": str(tmp_path / "out")}
    if config == "train.json":
        overrides["ckpt_dir"] = str(tmp_path / "ckpt")
    parser = _parser(config, **overrides)
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, torch.nn.Module)
    preprocessing = parser.get_parsed_content("train#preprocessing" if config == "train.json" else "preprocessing")
    item = find_asl_series(train_data)[0]
    sample = preprocessing(item)
    sample = sample[0] if isinstance(sample, list) else sample
    image = torch.as_tensor(np.asarray(sample["image"]))
    assert image.shape[0] == INPUT_CHANNELS
    with torch.no_grad():
        assert net(image[None]).shape[1] == 1
    if config == "train.json":
        assert type(parser.get_parsed_content("train#trainer")).__name__ == "SupervisedTrainer"
        assert type(parser.get_parsed_content("validate#evaluator")).__name__ == "SupervisedEvaluator"
    else:
        assert type(parser.get_parsed_content("evaluator")).__name__ == "SupervisedEvaluator"
        handlers = parser.get("handlers")
        assert handlers[0]["_target_"] == "CheckpointLoader"
        assert "load_path" in handlers[0]


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_tiny_train_run(train_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    result = bundle_run(
        "train.json",
        "--dataset_dir", str(train_data),
        "--max_epochs", "2",
        "--val_interval", "1",
        "--patch_size", "[16,16,4]",
        "--batch_size", "2",
        "--ckpt_dir", str(ckpt),
        "--output_dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "val_nmse" in result.stdout + result.stderr  # validation ran
    assert "Epoch[2] Complete" in result.stdout + result.stderr
    # keep_weights "last": model.pt is the network at the end of the schedule, the best validation
    # checkpoint is kept beside it
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    final = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 2 * final["trainer"]["epoch_length"]
    for name, tensor in final["model"].items():
        assert torch.equal(state[name], tensor), name
    assert (ckpt / "model_best_val.pt").is_file()  # saved by the validation's key-metric CheckpointSaver
    net = _parser("inference.json").get_parsed_content("network_def")
    net.load_state_dict(state)  # the trained weights fit the inference network
    assert {p.name for p in ckpt.iterdir()} <= {"model.pt", "checkpoint.pt", "model_best_val.pt"}  # nothing partial


def test_validation_scores_every_series_at_every_k(train_data, tmp_path):
    """val_num_pairs [1, 2, 3, 4]: each validation series is scored at each k (first k pairs), so the
    checkpoint metric covers the SNR range the bundle is used at."""
    parser = _parser("train.json", dataset_dir=str(train_data), ckpt_dir=str(tmp_path / "c"))
    series = parser.get_parsed_content("partitions")[1]
    items = parser.get_parsed_content("val_datalist")
    assert len(series) >= 1 and len(items) == 4 * len(series)
    select = parser.get_parsed_content("validate#preprocessing")
    used = [select(item, end=2)["num_pairs_used"] for item in items[:4]]  # load, select pairs
    assert used == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ evaluation


@pytest.mark.slow
def test_evaluate_writes_csv(train_data, weights, tmp_path):
    out = tmp_path / "eval"
    result = bundle_run(
        EVALUATE, "--dataset_dir", str(train_data), "--output_dir", str(out),
        "--handlers#0#load_path", str(weights),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "evaluation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {"series", "method", "num_pairs", "nmse_corrected", "effective_pairs", "psnr", "ssim"}
    assert columns <= set(rows[0])
    series = {str(Path(i["rel_dir"]) / i["stem"]) for i in find_asl_series(train_data)}
    methods = {"enhanced", "mean", "gaussian"}
    assert {(r["series"], r["method"]) for r in rows} == {(s, m) for s in series | {"ALL"} for m in methods}
    assert len(rows) == (len(series) + 1) * len(methods)
    for row in rows:
        assert row["num_pairs"] == "2"
        for key in ("nmse_corrected", "effective_pairs", "psnr", "ssim"):
            assert np.isfinite(float(row[key])), row
    # a 2-pair mean is worth about 2 pairs
    mean_all = next(r for r in rows if r["series"] == "ALL" and r["method"] == "mean")
    assert 1.0 < float(mean_all["effective_pairs"]) < 4.0


# ------------------------------------------------------------------------------------------ inference


def _hand_pairs(volumes: np.ndarray, types: list[str]) -> list[np.ndarray]:
    """control - label of the i-th control and i-th label (either order); deltam volumes as they are."""
    controls = [i for i, t in enumerate(types) if t == "control"]
    labels = [i for i, t in enumerate(types) if t == "label"]
    pairs = [(min(c, lab), volumes[..., c] - volumes[..., lab]) for c, lab in zip(controls, labels)]
    pairs += [(i, volumes[..., i]) for i, t in enumerate(types) if t == "deltam"]
    return [p for _, p in sorted(pairs, key=lambda p: p[0])]


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory, weights):
    """One inference run over series of every kind (K = 3 pairs) and its expectations."""
    root = tmp_path_factory.mktemp("infer_data")
    out = tmp_path_factory.mktemp("infer_out") / "out"
    cases = {}

    def add(rel: str, stem: str, volumes, types, m0=None, affine=AFFINE):
        write_series(root / rel, stem, volumes, types, m0=m0, affine=affine)
        cases[(rel, stem)] = (volumes, types, affine)

    volumes, types, _ = phantom_series(SHAPE, num_pairs=5, seed=0)  # m0 + control-first
    add("sub-01/ses-1/perf", "sub-01_ses-1", volumes, types)
    add("sub-04/perf", "sub-04", volumes * SCALE_C, types)  # the same series scaled by c
    volumes, types, _ = phantom_series(SHAPE, num_pairs=4, seed=1, label_first=True, m0_volumes=0)
    affine = AFFINE.copy()
    affine[:3, :3] = np.array([[0, -2.5, 0], [2.5, 0, 0], [0, 0, 4.0]])
    add("sub-02/perf", "sub-02", volumes, types, m0=volumes[..., 0] * 1.2 + 100, affine=affine)
    order = [1, 0, 2, 3, 5, 4, 6, 7]  # c,l,l,c,c,l,l,c
    add("sub-03/ses-2/perf", "sub-03_ses-2", volumes[..., order], [types[i] for i in order])
    deltam = volumes[..., 1::2] - volumes[..., 0::2]
    add("sub-05/perf", "sub-05", deltam, ["deltam"] * deltam.shape[-1])
    m0_deltam = np.concatenate([volumes[..., 1:2] * 1.25, deltam], axis=-1)
    add("sub-06/perf", "sub-06", m0_deltam, ["m0scan"] + ["deltam"] * deltam.shape[-1])
    result = bundle_run(
        "inference.json", "--dataset_dir", str(root), "--output_dir", str(out), "--num_pairs", "3",
        "--handlers#0#load_path", str(weights),
    )  # fmt: skip
    return result, root, out, cases


@pytest.mark.slow
def test_inference_exit_and_summary(inference_run):
    result, _, _, cases = inference_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert f"All {len(cases)} series done" in result.stdout


@pytest.mark.slow
def test_inference_writes_exactly_the_contract(inference_run):
    result, _, out, cases = inference_run
    assert result.returncode == 0, result.stderr[-3000:]
    files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    required = set()
    for rel, stem in cases:
        for desc in ("enhanced", "mean"):
            required |= {Path(rel) / f"{stem}_desc-{desc}_deltam.nii.gz", Path(rel) / f"{stem}_desc-{desc}_deltam.json"}
    assert required <= files
    stems = {stem for _, stem in cases}
    for path in files - required:  # extra outputs from the CBF/QC work follow the naming rules
        name = path.name
        ok = (
            any(name.startswith(f"{s}_desc-") for s in stems)
            or name.endswith("_qc.png")
            or name in ("dataset_description.json", ".bidsignore")
            or name.endswith(".tsv")
        )
        assert ok, f"unexpected output {path}"
    leftovers = [p for p in files if p.name != ".bidsignore" and (p.name.startswith(".") or "partial" in p.name)]
    assert not leftovers and not [p for p in files if p.name.endswith(".tmp")]
    # nested input folders are mirrored
    assert (out / "sub-01" / "ses-1" / "perf").is_dir() and (out / "sub-03" / "ses-2" / "perf").is_dir()


@pytest.mark.slow
def test_inference_values_affine_shape_dtype(inference_run, weights):
    result, _, out, cases = inference_run
    assert result.returncode == 0, result.stderr[-3000:]
    for (rel, stem), (volumes, types, affine) in cases.items():
        expected_mean = np.mean(_hand_pairs(volumes, types)[:3], axis=0)
        for desc in ("enhanced", "mean"):
            image = nib.load(out / rel / f"{stem}_desc-{desc}_deltam.nii.gz")
            assert image.get_data_dtype() == np.float32
            assert image.shape == SHAPE
            np.testing.assert_allclose(image.affine, affine, atol=1e-5)
            data = np.asarray(image.dataobj)
            assert data.dtype == np.float32 and np.isfinite(data).all()
            if desc == "mean":
                np.testing.assert_allclose(data, expected_mean, rtol=1e-5, atol=1e-3)
            sidecar = json.loads((out / rel / f"{stem}_desc-{desc}_deltam.json").read_text())
            assert sidecar["NumPairsUsed"] == 3
            assert sidecar["PairsUsed"] == [1, 2, 3]
            assert sidecar["TotalPairsInSeries"] == len(_hand_pairs(volumes, types))
            assert sidecar["GeneratedBy"]["Version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
            assert sidecar["Settings"]["num_pairs"] == 3
            assert sidecar["Sources"][0] == f"bids:raw:{rel}/{stem}_asl.nii.gz"  # a BIDS URI (DatasetLinks: raw)
    m0_sources = {
        stem: json.loads((out / rel / f"{stem}_desc-mean_deltam.json").read_text())["M0Source"] for rel, stem in cases
    }
    assert m0_sources == {
        "sub-01_ses-1": "included", "sub-04": "included", "sub-02": "separate",
        "sub-03_ses-2": "absent", "sub-05": "absent", "sub-06": "included",
    }  # fmt: skip


@pytest.mark.slow
def test_inference_is_scale_equivariant(inference_run):
    """sub-04 is sub-01 with every volume (M0 too) times c: both outputs scale by c."""
    result, _, out, _ = inference_run
    assert result.returncode == 0, result.stderr[-3000:]
    for desc in ("enhanced", "mean"):
        base = np.asarray(nib.load(out / "sub-01/ses-1/perf" / f"sub-01_ses-1_desc-{desc}_deltam.nii.gz").dataobj)
        scaled = np.asarray(nib.load(out / "sub-04/perf" / f"sub-04_desc-{desc}_deltam.nii.gz").dataobj)
        np.testing.assert_allclose(scaled, SCALE_C * base, rtol=1e-4, atol=1e-4 * SCALE_C * np.abs(base).max())


@pytest.mark.slow
def test_noise_free_series_is_left_unblurred(tmp_path, weights):
    """Pairs that agree exactly (no noise to remove): the noise bound makes the enhanced deltaM and CBF
    equal the plain mean's, so a clean or very high-SNR scan loses no grey/white contrast (issue 4)."""
    volumes, types, _ = phantom_series(SHAPE, num_pairs=3)
    m0 = volumes[..., 0]
    pairs = [v for _ in range(3) for v in (0.8 * m0, 0.8 * m0 - 0.01 * m0 * (1.2 + np.cos(np.indices(SHAPE)[0])))]
    clean = np.stack([m0, *pairs], axis=-1)
    write_series(tmp_path / "in" / "sub-01" / "perf", "sub-01", clean, ["m0scan"] + ["control", "label"] * 3)
    out = tmp_path / "out"
    result = bundle_run(
        "inference.json", "--dataset_dir", str(tmp_path / "in"), "--output_dir", str(out),
        "--num_pairs", "2", "--handlers#0#load_path", str(weights),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("deltam", "cbf"):
        maps = {d: np.asarray(nib.load(out / "sub-01/perf" / f"sub-01_desc-{d}_{kind}.nii.gz").dataobj)
                for d in ("enhanced", "mean")}  # fmt: skip
        assert np.abs(maps["mean"]).max() > 0
        np.testing.assert_allclose(maps["enhanced"], maps["mean"], rtol=1e-4, atol=1e-4 * np.abs(maps["mean"]).max())
