"""The MONAI Deploy app (deploy/app.py) on tiny BIDS-ASL input: run in one Python process through the
Application API with HOLOSCAN_* variables, and as the documented command with -i/-o/-m; its float32 outputs
carry the input's affine and equal the bundle's own ``monai.bundle run`` inference.

The App SDK lives in its own venv (.venv-deploy, ~1.5 GB with torch): these tests skip without it. Create it
with: python3 -m venv .venv-deploy; .venv-deploy/bin/pip install torch==2.13.0 (the CPU build), then
.venv-deploy/bin/pip install -r deploy/requirements.txt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import AFFINE, BUNDLE, CONFIGS, ROOT, phantom_series, write_series
from monai.bundle import ConfigParser

#: every test here starts a process (monai.bundle run, the deploy app, mlflow training)
pytestmark = pytest.mark.slow

DEPLOY_PY = ROOT / ".venv-deploy" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not DEPLOY_PY.exists(), reason="no .venv-deploy (MONAI Deploy App SDK venv, ~1.5 GB): see deploy/README"
)
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore", "ASL_NUM_PAIRS": "2"}
ENV.pop("PYTHONPATH", None)  # the deploy venv must not see the project venv's packages
ENV["PYTHONPATH"] = str(ROOT / "asl_bundle")  # asl_enhance, as deploy/app.py documents


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """Two series (M0 included / separate M0 and label-first, rotated affine), weights and their model.ts."""
    root = tmp_path_factory.mktemp("deploy")
    data = root / "data"
    volumes, types, _ = phantom_series((20, 18, 8), num_pairs=4, seed=0)
    write_series(data / "sub-01" / "perf", "sub-01", volumes, types)
    volumes, types, _ = phantom_series((20, 18, 8), num_pairs=3, seed=1, label_first=True, m0_volumes=0)
    affine = AFFINE.copy()
    affine[:3, :3] = np.array([[0, -2.5, 0], [2.5, 0, 0], [0, 0, 4.0]])
    write_series(data / "sub-02" / "ses-1" / "perf", "sub-02_ses-1", volumes, types, m0=volumes[..., 0] * 1.2 + 100,
                 affine=affine)  # fmt: skip
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(3)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    torch.save(net.state_dict(), root / "model.pt")
    env = {**ENV, "PYTHON": sys.executable}
    export = ["bash", str(ROOT / "scripts" / "export_model.sh"), "--ckpt", str(root / "model.pt"),
              "--out", str(root / "model.ts")]  # fmt: skip
    result = subprocess.run(export, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle_out = root / "bundle_out"
    run_bundle(data, bundle_out, root / "model.pt", 2)
    return {"root": root, "data": data, "model": root / "model.ts", "bundle_out": bundle_out}


def run_bundle(data: Path, out: Path, weights: Path, num_pairs: int, *overrides: str) -> None:
    """The bundle's own runner on ``data`` (no CBF, no QC): the reference the app must reproduce."""
    run = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
           "--bundle_root", str(BUNDLE), "--dataset_dir", str(data), "--output_dir", str(out),
           "--num_pairs", str(num_pairs), "--handlers#0#load_path", str(weights), "--writer#write_cbf", "false",
           "--writer#write_qc", "false", *overrides]  # fmt: skip
    result = subprocess.run(
        run, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**ENV, "PYTHON": sys.executable}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def check_against_bundle(out: Path, bundle_out: Path, data: Path, stems: list[str]) -> None:
    found = sorted(p.relative_to(out) for p in out.rglob("*_desc-enhanced_deltam.nii.gz"))
    assert [p.name.split("_desc-")[0] for p in found] == stems
    for rel in found:
        app_img, ref_img = nib.load(out / rel), nib.load(bundle_out / rel)
        source = nib.load(next(data.rglob(rel.name.split("_desc-")[0] + "_asl.nii.gz")))
        assert app_img.get_data_dtype() == np.float32
        np.testing.assert_allclose(app_img.affine, source.affine, atol=1e-6)  # the input's affine, kept
        want = ref_img.get_fdata(dtype=np.float32)
        got = app_img.get_fdata(dtype=np.float32)
        assert np.abs(want).max() > 1.0  # real deltaM, not a uint8-cast or empty map
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
        mean = nib.load(out / str(rel).replace("desc-enhanced", "desc-mean")).get_fdata(dtype=np.float32)
        np.testing.assert_allclose(mean, nib.load(bundle_out / str(rel).replace("desc-enhanced", "desc-mean"))
                                   .get_fdata(dtype=np.float32), rtol=1e-6, atol=1e-6)  # fmt: skip
        # the SD map (k = 2) as the bundle makes it, named in the enhanced map's sidecar
        sd_rel = str(rel).replace("desc-enhanced", "desc-enhancedsd")
        sd, sd_ref = (nib.load(root / sd_rel).get_fdata(dtype=np.float32) for root in (out, bundle_out))
        assert sd.min() >= 0 and sd.max() > 0
        np.testing.assert_allclose(sd, sd_ref, rtol=1e-4, atol=1e-4 * sd_ref.max())
        sidecar = json.loads((out / str(rel).replace(".nii.gz", ".json")).read_text())
        assert sidecar["UncertaintyMap"] == Path(sd_rel).name
        bundle_sidecar = json.loads((bundle_out / str(rel).replace(".nii.gz", ".json")).read_text())
        assert sidecar["InputPerfusionToNoise"] == bundle_sidecar["InputPerfusionToNoise"]  # as the bundle says it


def test_app_in_process_with_holoscan_env(case, tmp_path):
    """One Python process builds and runs the Application (paths from HOLOSCAN_* variables)."""
    out = tmp_path / "out"
    env = {**ENV, "HOLOSCAN_INPUT_PATH": str(case["data"]), "HOLOSCAN_OUTPUT_PATH": str(out),
           "HOLOSCAN_MODEL_PATH": str(case["model"])}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "deploy"), env["PYTHONPATH"]])  # where app.py is
    code = "import sys; sys.argv = ['app.py']; from app import ASLEnhanceApp; ASLEnhanceApp().run()"
    result = subprocess.run([str(DEPLOY_PY), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_against_bundle(out, case["bundle_out"], case["data"], ["sub-01", "sub-02_ses-1"])


def test_app_gives_the_network_its_pair_count(tmp_path):
    """At 3 pairs the risk-chosen blend acts (``restore_sure_from`` 3): the app's maps are the bundle's at 3
    pairs, which differ from the maps without the blend, so the app passes the network its k. The shipped
    weights on a noisy series: there the blend's share is inside (0, 1) (0.83 when this was written)."""
    data, ref, no_blend, out = (tmp_path / name for name in ("data", "ref", "no_blend", "out"))
    volumes, types, _ = phantom_series((20, 18, 8), num_pairs=4, seed=0)
    pairs = [i for i, kind in enumerate(types) if kind != "m0scan"]
    volumes[..., pairs] += np.random.default_rng(5).normal(0, 10, volumes[..., pairs].shape)
    write_series(data / "sub-03" / "perf", "sub-03", volumes, types)
    weights, model = BUNDLE / "models" / "model.pt", BUNDLE / "models" / "model.ts"
    run_bundle(data, ref, weights, 3)
    run_bundle(data, no_blend, weights, 3, "--restore_sure_from", "0")
    cmd = [str(DEPLOY_PY), str(ROOT / "deploy" / "app.py"), "-i", str(data), "-o", str(out), "-m", str(model)]
    env = {**ENV, "ASL_NUM_PAIRS": "3"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_against_bundle(out, ref, data, ["sub-03"])
    rel = Path("sub-03") / "perf" / "sub-03_desc-enhanced_deltam.nii.gz"
    blended, plain = (nib.load(d / rel).get_fdata(dtype=np.float32) for d in (ref, no_blend))
    assert np.abs(blended - plain).max() > 1e-2 * np.abs(plain).max()


def test_app_command_on_one_nifti(case, tmp_path):
    """``python deploy/app.py -i SERIES.nii.gz -o OUT -m model.ts``: a single series file as input."""
    out = tmp_path / "out"
    series = case["data"] / "sub-02" / "ses-1" / "perf" / "sub-02_ses-1_asl.nii.gz"
    cmd = [str(DEPLOY_PY), str(ROOT / "deploy" / "app.py"), "-i", str(series), "-o", str(out), "-m", str(case["model"])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # a single file has no BIDS folders above it: outputs go to the output root
    files = sorted(p.name for p in out.rglob("*.nii.gz"))
    assert files == [f"sub-02_ses-1_desc-{d}_deltam.nii.gz" for d in ("enhanced", "enhancedsd", "mean")]
    ref = case["bundle_out"] / "sub-02" / "ses-1" / "perf"
    got = nib.load(out / files[0])
    np.testing.assert_allclose(got.get_fdata(dtype=np.float32),
                               nib.load(ref / files[0]).get_fdata(dtype=np.float32), rtol=1e-5, atol=1e-3)  # fmt: skip
    np.testing.assert_allclose(got.affine, nib.load(series).affine, atol=1e-6)


def test_app_rejects_input_without_aslcontext(case, tmp_path):
    bare = tmp_path / "in" / "sub-09_asl.nii.gz"
    bare.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2, 4), np.float32), AFFINE), bare)
    cmd = [str(DEPLOY_PY), str(ROOT / "deploy" / "app.py"), "-i", str(bare), "-o", str(tmp_path / "out"),
           "-m", str(case["model"])]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert result.returncode != 0
    assert "aslcontext" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("*_deltam.nii.gz"))


def test_app_refuses_a_bad_pair_count_in_one_line(case, tmp_path):
    """``ASL_NUM_PAIRS=2.5`` is read as the bundle reads ``--num_pairs``: one line, non-zero, nothing written."""
    out = tmp_path / "out"
    cmd = [
        str(DEPLOY_PY),
        str(ROOT / "deploy" / "app.py"),
        "-i",
        str(case["data"]),
        "-o",
        str(out),
        "-m",
        str(case["model"]),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**ENV, "ASL_NUM_PAIRS": "2.5"}
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "ERROR: ASL_NUM_PAIRS: num_pairs must be a whole number of pairs (or 'all'), got '2.5'" in result.stderr
    assert not out.exists() or not any(out.rglob("*.nii.gz"))
