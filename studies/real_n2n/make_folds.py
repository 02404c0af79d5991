"""Two leave-subject-out folds of the real long scans for Noise2Noise fine-tuning (study only).

The 8 real scans are three people: ds000240 sub-01, the Prisma volunteer (six runs) and the Oxford
subject. Fold ``prisma`` trains on ds000240 and Oxford and tests on the six Prisma runs; fold ``other``
trains on the Prisma runs and tests on ds000240 and Oxford. Multi-PLD runs train on one series per PLD
block at PLD >= ``--min_pld`` (earlier blocks are mostly arterial signal); their tests use the
longest-PLD block, as asl-benchmark's fidelity part does.

    python studies/real_n2n/make_folds.py --real_asl ../shared/real-asl --ds000240 .cache/real/ds000240 \
        --out_dir data/real_n2n
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

PRISMA = ["prisma2dpasl", "prisma2dpcasl", "prisma2dmpld", "prisma3dpcasl", "prisma3dpasl", "prisma3dmpld"]
OTHER = ["ds000240", "oxfordmpld"]
FOLDS = {"prisma": (OTHER, PRISMA), "other": (PRISMA, OTHER)}


def subject_dir(name: str, real_asl: Path, ds000240: Path) -> Path:
    return ds000240 / "sub-01" if name == "ds000240" else real_asl / f"sub-{name}"


def per_volume_plds(sidecar: dict, num_volumes: int) -> list[float] | None:
    pld = sidecar.get("PostLabelingDelay")
    return [float(p) for p in pld] if isinstance(pld, list) and len(pld) == num_volumes else None


def link_subject(src: Path, dest_root: Path, name: str) -> None:
    """The whole subject, linked under its study name (sub-<name>)."""
    dest = dest_root / f"sub-{name}"
    dest.mkdir(parents=True, exist_ok=True)
    for f in (src / "perf").iterdir():
        new = dest / "perf" / f.name.replace(src.name, f"sub-{name}")
        new.parent.mkdir(exist_ok=True)
        if not new.exists():
            os.symlink(f.resolve(), new)


def write_pld_block(src: Path, dest_root: Path, name: str, pld: float) -> None:
    """One PLD block of a multi-PLD run (plus its included M0 volumes) as a single-PLD series."""
    stem = src.name
    img = nib.load(src / "perf" / f"{stem}_asl.nii.gz")
    sidecar = json.loads((src / "perf" / f"{stem}_asl.json").read_text())
    types = (src / "perf" / f"{stem}_aslcontext.tsv").read_text().split()[1:]
    plds = per_volume_plds(sidecar, len(types))
    keep = [i for i, t in enumerate(types) if t == "m0scan" or abs(plds[i] - pld) < 1e-6]
    tag = f"{name}pld{int(round(pld * 100)):03d}"
    out = dest_root / f"sub-{tag}" / "perf"
    out.mkdir(parents=True, exist_ok=True)
    data = np.asarray(img.dataobj)[..., keep]
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), out / f"sub-{tag}_asl.nii.gz")
    (out / f"sub-{tag}_aslcontext.tsv").write_text("volume_type\n" + "\n".join(types[i] for i in keep) + "\n")
    sidecar["PostLabelingDelay"] = [plds[i] for i in keep]
    (out / f"sub-{tag}_asl.json").write_text(json.dumps(sidecar, indent=1))


def training_set(names: list[str], dest: Path, real_asl: Path, ds000240: Path, min_pld: float) -> list[str]:
    made = []
    for name in names:
        src = subject_dir(name, real_asl, ds000240)
        sidecar = json.loads(next((src / "perf").glob("*_asl.json")).read_text())
        types = next((src / "perf").glob("*_aslcontext.tsv")).read_text().split()[1:]
        plds = per_volume_plds(sidecar, len(types))
        blocks = sorted({p for p, t in zip(plds, types) if t != "m0scan"}) if plds else []
        if len(blocks) > 1:
            for p in blocks:
                if p >= min_pld:
                    write_pld_block(src, dest, name, p)
                    made.append(f"{name} PLD {p} s")
        else:
            link_subject(src, dest, name)
            made.append(name)
    return made


def test_set(names: list[str], dest: Path, real_asl: Path, ds000240: Path) -> None:
    for name in names:
        link_subject(subject_dir(name, real_asl, ds000240), dest, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real_asl", type=Path, required=True)
    ap.add_argument("--ds000240", type=Path, required=True)
    ap.add_argument("--out_dir", type=Path, required=True)
    ap.add_argument("--min_pld", type=float, default=1.0)
    args = ap.parse_args()
    description = {"Name": "real_n2n fold", "BIDSVersion": "1.9.0", "DatasetType": "raw"}
    for fold, (train, test) in FOLDS.items():
        for part in ("train", "test"):
            root = args.out_dir / fold / part
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            (root / "dataset_description.json").write_text(json.dumps(description))
        made = training_set(train, args.out_dir / fold / "train", args.real_asl, args.ds000240, args.min_pld)
        test_set(test, args.out_dir / fold / "test", args.real_asl, args.ds000240)
        print(f"fold {fold}: train {made}; test {test}")


if __name__ == "__main__":
    main()
