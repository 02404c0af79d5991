"""Split one long ASL scan by pairs into two BIDS copies: one to fine-tune on, one to evaluate on.

Usage: python studies/finetune_real/demo_finetune_real.py [--source .cache/real/ds000240] --output_dir DIR
[--finetune_pairs 30]. Writes DIR/finetune (pairs 1..F) and DIR/evaluate (pairs F+1..N); every other
volume (M0, ...) is kept in both, and a separate M0 file is copied. Both copies share one anatomy, so a
fine-tune/evaluate demonstration on them shows the mechanics and the adaptation to this scanner's
noise, not generalisation to new subjects.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from asl_enhance.bids import find_asl_series, load_asl_series


def split_series(item: dict, out_root: Path, keep: list[int], source_root: Path) -> Path:
    """Write the series of ``item`` with only the pairs in ``keep`` (0-based) under ``out_root``."""
    series = load_asl_series(item)
    pair_vols = {v for pair in series.pair_volumes for v in pair}
    img = nib.load(item["asl"])
    data = np.asarray(img.dataobj, dtype=np.float32)  # scaled values, stored as float32 (no requantising)
    context = Path(item["asl"]).with_name(Path(item["asl"]).name.replace("_asl.nii.gz", "_aslcontext.tsv"))
    types = context.read_text().split()[1:]
    chosen = {v for i in keep for v in series.pair_volumes[i]}
    volumes = [v for v in range(data.shape[3]) if v not in pair_vols or v in chosen]
    rel = Path(item["asl"]).parent.relative_to(source_root)
    folder = out_root / rel
    folder.mkdir(parents=True, exist_ok=True)
    asl = folder / Path(item["asl"]).name
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data[..., volumes], img.affine, header), asl)
    (folder / context.name).write_text("volume_type\n" + "\n".join(types[v] for v in volumes) + "\n")
    sidecar_path = Path(item["asl"]).with_name(Path(item["asl"]).name.replace(".nii.gz", ".json"))
    sidecar = json.loads(sidecar_path.read_text())
    if "TotalAcquiredPairs" in sidecar:
        sidecar["TotalAcquiredPairs"] = len(keep)
    (folder / sidecar_path.name).write_text(json.dumps(sidecar, indent=2))
    for extra in Path(item["asl"]).parent.glob("*_m0scan.*"):
        shutil.copy2(extra, folder / extra.name)
    return asl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(".cache/real/ds000240"))
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--finetune_pairs", type=int, default=30)
    args = parser.parse_args(argv)
    for item in find_asl_series(args.source):
        num = load_asl_series(item).pairs.shape[0]
        if num <= args.finetune_pairs + 2:
            print(f"skip {item['asl']}: {num} pairs", file=sys.stderr)
            continue
        for name, keep in (("finetune", range(args.finetune_pairs)), ("evaluate", range(args.finetune_pairs, num))):
            out = args.output_dir / name
            if (args.source / "dataset_description.json").is_file():
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(args.source / "dataset_description.json", out / "dataset_description.json")
            path = split_series(item, out, list(keep), args.source)
            print(f"{name}: pairs {keep.start + 1}-{keep.stop} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
