"""How noisy is each real scan's all-pair mean, the input of the no-harm check? (study only)

Noise over signal energy inside the brain: the noise twin's energy over the mean's less the twin's, with
every pair of the series (multi-PLD runs at their longest PLD, as the benchmark). Where it is far from 0
the all-pair input is not clean, and a denoiser is right to change its tissue medians.

    python studies/fidelity/allpair_noise.py --real .cache/real/ds000240 ../shared/real-asl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from asl_bench import core
from asl_bench import fidelity as fd


def noise_to_signal(series: core.Series) -> float:
    d = core.prepare(series, list(range(series.num_pairs)))
    mean, twin, brain = d["input_mean"], d["input_twin"], series.brain
    noise = float(np.sum(twin[brain] ** 2))
    return noise / max(float(np.sum(mean[brain] ** 2)) - noise, 1e-12)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--real", type=Path, nargs="+", required=True)
    args = p.parse_args()
    print("| scan | pairs | guide | noise / signal energy of the all-pair mean |\n|---|---|---|---|")
    for s in fd.load_real(args.real)[0]:
        guide = "M0" if s.m0 is not None else ("control" if np.any(s.item["guide"] > 0) else "none")
        print(f"| {s.name.split('/')[-1]} | {s.num_pairs} | {guide} | {noise_to_signal(s):.3f} |")


if __name__ == "__main__":
    main()
