"""What the SD map costs at k = 2 on this CPU: the network alone against the network plus the map, and a
whole ``monai.bundle run`` of inference.json with the map (default) against ``--uncertainty#draws 0``.

Volumes 64x64x20 and 96x96x48 (phantom series of 8 pairs, first 2 used). Runs alternate (with, without,
with, ...) so that load from other processes hits both alike; medians are printed.

Usage: python studies/uncertainty/timing.py [--repeats 5] [--bundle_repeats 3] [--out studies/uncertainty/timing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from asl_enhance.transforms import network_input, noise_twin

import asl_bench.core as bench
from asl_bench.calibration import shipped_handler

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"64x64x20": (64, 64, 20), "96x96x48": (96, 96, 48)}


def phantom(shape, num_pairs: int = 8, seed: int = 0):
    """M0 and pairs of a head-like phantom (tests/helpers.phantom_series at another size)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import phantom_series

    volumes, types, _ = phantom_series(shape, num_pairs=num_pairs, seed=seed)
    return volumes, types


def network_seconds(shape, repeats: int) -> dict[str, float]:
    model = bench.build_models(None)[0]
    handler = shipped_handler()
    volumes, _ = phantom(shape)
    pairs = np.moveaxis(volumes[..., 1::2] - volumes[..., 2::2], -1, 0)[:2].astype(np.float32)
    image, scale, _ = network_input(pairs.mean(axis=0), volumes[..., 0], twin=noise_twin(pairs))
    x = torch.as_tensor(image[None])
    plain, with_sd = [], []
    with torch.inference_mode():
        model.net(x)  # warm
        for _ in range(repeats):
            start = time.perf_counter()
            pred = model.net(x)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            pred = model.net(x)
            handler.sd_map(model.net, x, pred, [pairs / scale])
            with_sd.append(time.perf_counter() - start)
    return {"network_s": float(np.median(plain)), "network_plus_sd_s": float(np.median(with_sd))}


def bundle_seconds(shape, repeats: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_series

    volumes, types = phantom(shape)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    times: dict[str, list[float]] = {"with_sd": [], "without_sd": []}
    with tempfile.TemporaryDirectory() as tmp:
        write_series(Path(tmp) / "data" / "sub-01" / "perf", "sub-01", volumes, types)
        for r in range(repeats):
            for name, extra in (("with_sd", []), ("without_sd", ["--uncertainty#draws", "0"])):
                cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
                cmd += [str(ROOT / "asl_bundle" / "configs" / "inference.json"), "--bundle_root"]
                cmd += [str(ROOT / "asl_bundle"), "--dataset_dir", f"{tmp}/data", "--output_dir", f"{tmp}/out{r}{name}"]
                cmd += ["--num_pairs", "2", *extra]
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
                times[name].append(time.perf_counter() - start)
    return {f"bundle_{k}_s": float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bundle_repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    for name, shape in SHAPES.items():
        row = network_seconds(shape, args.repeats)
        if args.bundle_repeats:
            row.update(bundle_seconds(shape, args.bundle_repeats))
        row["network_ratio"] = row["network_plus_sd_s"] / row["network_s"]
        if args.bundle_repeats:
            row["bundle_ratio"] = row["bundle_with_sd_s"] / row["bundle_without_sd_s"]
        result[name] = row
        print(name, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
