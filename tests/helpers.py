"""Small BIDS-ASL series written by hand for tests: known values, any context order."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "asl_bundle"
CONFIGS = BUNDLE / "configs"
#: channels of the shipped network's input, as metadata.json declares them (the configs must agree)
INPUT_CHANNELS = json.loads((CONFIGS / "metadata.json").read_text())["network_data_format"]["inputs"]["image"][
    "num_channels"
]

AFFINE = np.diag([3.0, 3.0, 5.0, 1.0])
AFFINE[:3, 3] = [-40.0, -50.0, -20.0]


def write_series(
    folder: str | Path,
    stem: str,
    volumes: np.ndarray,
    volume_types: list[str],
    sidecar: dict | None = None,
    m0: np.ndarray | None = None,
    affine: np.ndarray = AFFINE,
) -> Path:
    """Write ``<stem>_asl.nii.gz``, its aslcontext and sidecar (and a separate M0); returns the ASL path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    asl = folder / f"{stem}_asl.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(volumes, np.float32), affine), asl)
    (folder / f"{stem}_aslcontext.tsv").write_text("volume_type\n" + "\n".join(volume_types) + "\n")
    default = {
        "ArterialSpinLabelingType": "PCASL",
        "PostLabelingDelay": 1.8,
        "LabelingDuration": 1.8,
        "M0Type": "Included" if "m0scan" in volume_types else ("Separate" if m0 is not None else "Absent"),
        "MagneticFieldStrength": 3,
        "BackgroundSuppression": False,
    }
    (folder / f"{stem}_asl.json").write_text(json.dumps(sidecar if sidecar is not None else default))
    if m0 is not None:
        nib.save(nib.Nifti1Image(np.asarray(m0, np.float32), affine), folder / f"{stem}_m0scan.nii.gz")
    return asl


def phantom_series(
    shape=(20, 18, 8),
    num_pairs: int = 6,
    seed: int = 0,
    label_first: bool = False,
    m0_volumes: int = 1,
    level: float = 1000.0,
):
    """A head-like M0, a control/label series with known deltaM and noise; returns (volumes, types, truth)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (x**2 + y**2 + 0.5 * z**2) < 0.8
    m0 = level * head * (1.0 + 0.1 * x)
    deltam = 0.01 * m0 * (1.0 + 0.5 * np.cos(3 * x) * np.sin(2 * y))
    volumes, types = [], []
    for _ in range(m0_volumes):
        volumes.append(m0 + rng.normal(0, 5, shape))
        types.append("m0scan")
    for _ in range(num_pairs):
        control = 0.8 * m0 + rng.normal(0, 0.004 * level, shape)
        label = control - deltam - rng.normal(0, 0.004 * level, shape)
        pair = [(label, "label"), (control, "control")] if label_first else [(control, "control"), (label, "label")]
        for vol, kind in pair:
            volumes.append(vol)
            types.append(kind)
    return np.stack(volumes, axis=-1), types, deltam


#: evaluation is an overlay on inference, as the README runs it
EVALUATE = ("inference.json", "evaluate.json")


def config_files(config: str | Sequence[str]) -> list[str]:
    """Paths of one bundle config or of an overlay stack (``EVALUATE``)."""
    names = [config] if isinstance(config, str) else list(config)
    return [str(CONFIGS / name) for name in names]


def bundle_run(config: str | Sequence[str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of one of the bundle's configs or an overlay stack (in a subprocess)."""
    files = config_files(config)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files[0] if len(files) == 1 else str(files)]
    cmd += ["--bundle_root", str(BUNDLE), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def run_in_process(config: str | Sequence[str], data: Path, out: Path, weights: Path, **override) -> int:
    """A bundle run (one config or an overlay stack such as ``EVALUATE``) in-process through MONAI's
    ConfigWorkflow, with ``weights`` loaded by the first handler; returns its exit status (the
    SystemExit code, 0 when none). Use ``bundle_run`` where the command line itself is under test."""
    from monai.bundle import ConfigWorkflow

    files = config_files(config)
    try:
        workflow = ConfigWorkflow(
            config_file=files if len(files) > 1 else files[0],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=False,
            workflow_type="infer",
            bundle_root=str(BUNDLE),
            dataset_dir=str(data),
            output_dir=str(out),
            **{"handlers#0#load_path": str(weights)},
            **override,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def write_phantom_dataset(
    root: str | Path,
    count: int,
    shape: tuple[int, ...] = (20, 18, 8),
    num_pairs: int = 5,
    first_seed: int = 0,
    alternate_order: bool = False,
) -> Path:
    """A BIDS-ASL data set of ``count`` phantom subjects ``sub-00``.. (seed ``first_seed + i``); with
    ``alternate_order`` odd subjects store label before control. Returns ``root``."""
    root = Path(root)
    for i in range(count):
        volumes, types, _ = phantom_series(
            shape, num_pairs=num_pairs, seed=first_seed + i, label_first=alternate_order and i % 2 == 1
        )
        write_series(root / f"sub-{i:02d}" / "perf", f"sub-{i:02d}", volumes, types)
    return root


def load_study(relative: str) -> ModuleType:
    """Import a study script (``studies/<relative>``) by its path: studies are scripts, not packages."""
    path = ROOT / "studies" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_inference():
    """The shipped network (models/model.pt, eval mode) and the parsed inference.json it was built from."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True))
    return net.eval(), parser
