"""Fine-tune the shipped bundle on a site's own BIDS-ASL long scans and write a NEW bundle version.

Usage: python scripts/finetune_bundle.py --dataset_dir DIR --output_bundle NEW_BUNDLE_DIR
[--version X] [--data_description TEXT] [--source_bundle asl_bundle] [--base_weights PT] [-- overrides...]
e.g. ``-- --max_epochs 5 --val_fraction 0.25``. It copies the source bundle to NEW_BUNDLE_DIR (the
source is never written), keeps the shipped weights as ``models/base_model.pt``, runs
train.json + finetune.json there (target: mean of the unused pairs, so no clean data is needed; a lower
learning rate; checkpoint chosen on held-out series), installs the best checkpoint as
``models/model.pt``, records the new version, a changelog entry and the data in metadata.json, and
re-exports ``models/model.ts`` from the new weights (what MONAI Deploy loads). The data set and the
overrides are checked before anything is written; a run that fails leaves no bundle behind (its logs and
checkpoints stay in NEW_BUNDLE_DIR_runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_CONFIGS = ("train.json", "finetune.json")


def bump_version(version: str) -> str:
    """0.1.0 -> 0.1.1 (last numeric field + 1); anything else gets a ``-finetuned`` suffix."""
    head, _, last = version.rpartition(".")
    return f"{head}.{int(last) + 1}" if head and last.isdigit() else f"{version}-finetuned"


def copy_bundle(source: Path, target: Path, base_weights: Path | None = None) -> None:
    """Copy the bundle without caches, logs or the training checkpoint (``main`` has refused an existing target)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "checkpoint.pt", "finetune", "eval", "logs")
    shutil.copytree(source, target, ignore=ignore)
    if base_weights is not None:
        shutil.copy2(base_weights, target / "models" / "model.pt")
    (target / "models" / "model.pt").rename(target / "models" / "base_model.pt")


def check_inputs(source: Path, dataset_dir: Path, overrides: list[str]) -> None:
    """Before anything is written: every ``--key`` override names a setting of the fine-tuning configs, and
    the data set has enough series to hold some out for choosing the checkpoint (``val_fraction``)."""
    from asl_enhance.failures import find_series_or_exit
    from monai.bundle import ConfigParser
    from monai.data import partition_dataset

    parser = ConfigParser()
    parser.read_config([str(source / "configs" / name) for name in FINETUNE_CONFIGS])
    keys = [token[2:] for token in overrides if token.startswith("--")]
    unknown = [key for key in keys if parser.get(key) is None and key not in parser.get()]
    if unknown:
        raise SystemExit(f"ERROR: unknown setting(s) {', '.join('--' + k for k in unknown)}: not in {FINETUNE_CONFIGS}")
    given = dict(zip(overrides[::2], overrides[1::2]))
    fraction = float(given.get("--val_fraction", parser.get("val_fraction")))
    count = len(find_series_or_exit(dataset_dir))
    train, held_out = partition_dataset(list(range(count)), ratios=[1.0 - fraction, fraction], shuffle=True, seed=0)
    if not train or not held_out:
        need = next(
            n for n in range(2, 1000) if all(partition_dataset(list(range(n)), ratios=[1.0 - fraction, fraction]))
        )
        raise SystemExit(
            f"ERROR: {dataset_dir}: {count} series; fine-tuning trains on some and keeps the checkpoint that scores "
            f"best on the others (val_fraction {fraction:g}): give at least {need} series or a larger --val_fraction"
        )


def run_finetune(bundle: Path, dataset_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    configs = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "finetune.json")]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr(configs),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(dataset_dir),
        "--initial_weights",
        str(bundle / "models" / "base_model.pt"),
        "--ckpt_dir",
        str(runs_dir(bundle) / "checkpoints"),
        "--output_dir",
        str(runs_dir(bundle)),
        *overrides,
    ]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def runs_dir(bundle: Path) -> Path:
    """Logs and checkpoints of the fine-tuning run: beside the new bundle, not inside it."""
    return bundle.parent / f"{bundle.name}_runs"


def export_torchscript(bundle: Path) -> subprocess.CompletedProcess:
    """models/model.ts from the new weights and metadata (the copied one holds the base weights)."""
    cmd = ["bash", str(ROOT / "scripts" / "export_model.sh"), "--bundle_root", str(bundle)]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def update_metadata(
    bundle: Path, version: str, base_version: str, dataset_dir: Path, description: str, overrides: list[str]
) -> dict:
    """New version, changelog entry and data source in the new bundle's metadata.json."""
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    date = datetime.date.today().isoformat()
    settings = " ".join(overrides) or "defaults of finetune.json"
    entry = (
        f"{date}: fine-tuned from version {base_version} on {description} ({dataset_dir}); "
        f"target = mean of the unused pairs (Noise2Noise), learning rate and epochs from finetune.json, "
        f"overrides: {settings}; checkpoint chosen on held-out series"
    )
    meta["changelog"] = {version: entry, **meta.get("changelog", {})}
    meta["version"] = version
    meta["data_source"] = f"Fine-tuned on {description} ({dataset_dir}); base model: {meta.get('data_source', '')}"
    path.write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--output_bundle", type=Path, required=True)
    parser.add_argument("--source_bundle", type=Path, default=ROOT / "asl_bundle")
    parser.add_argument("--version", default=None, help="new version (default: the source's, last field + 1)")
    parser.add_argument("--data_description", default="the site's own BIDS-ASL series")
    parser.add_argument("--base_weights", type=Path, default=None, help="default: the source's models/model.pt")
    args = parser.parse_args(argv)
    base_version = json.loads((args.source_bundle / "configs" / "metadata.json").read_text())["version"]
    version = args.version or bump_version(base_version)
    bundle = args.output_bundle.resolve()
    if bundle.exists():
        raise SystemExit(f"ERROR: {bundle} exists: choose a new --output_bundle")
    check_inputs(args.source_bundle, args.dataset_dir.resolve(), overrides)
    copy_bundle(args.source_bundle, bundle, args.base_weights)
    result = run_finetune(bundle, args.dataset_dir.resolve(), overrides)
    best = runs_dir(bundle) / "checkpoints" / "model.pt"
    if result.returncode != 0 or not best.is_file():
        why = f"training exited with status {result.returncode}" if result.returncode else "no checkpoint was kept"
        return fail(bundle, f"fine-tuning failed ({why}; logs in {runs_dir(bundle)})")
    shutil.copy2(best, bundle / "models" / "model.pt")
    update_metadata(bundle, version, base_version, args.dataset_dir, args.data_description, overrides)
    if export_torchscript(bundle).returncode != 0:
        return fail(bundle, "exporting models/model.ts from the new weights failed")
    print(f"new bundle version {version} at {bundle} (weights: models/model.pt, model.ts; base: models/base_model.pt)")
    return 0


def fail(bundle: Path, message: str) -> int:
    """No half-made bundle: remove it and say why (the run's logs stay beside it)."""
    shutil.rmtree(bundle, ignore_errors=True)
    print(f"ERROR: {message}; no bundle written at {bundle}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
