"""Per scan and band: how far the k-pair mean stands above its noise twin, and how well the twin reads the noise.

For each real scan, k and disjoint group of k pairs, the input (k-pair mean) and its noise twin are split into
the gate's bands (differences of Gaussians, coarse to fine) and their energies summed over the head:

- ``S``: input energy over twin energy (the gate's ``band_test`` statistic): near 1 when the band holds no
  perfusion the k pairs can show, far above 1 when it does;
- ``null``: the same on the perfusion-free series (each pair minus the all-pair mean), divided by (1 - k / N),
  the share of the k-pair noise left after subtracting the N-pair mean: 1 when the twin reads the noise of
  the mean right, above 1 when it under-reads it (pairs whose noise correlates), below 1 when it over-reads.

    python studies/noise_gated_restore/band_energy.py --real .cache/real/ds000240 ../shared/real-asl \\
        data/real-phantom --ks 2 4
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "asl_bundle")]

from asl_enhance.smoothing import gaussian_smooth  # noqa: E402
from asl_enhance.transforms import noise_twin  # noqa: E402

from asl_bench import core as bench  # noqa: E402
from asl_bench.fidelity import load_real  # noqa: E402

#: the shipped gate's bands (restore_bands of inference.json), coarse to fine
BANDS = ((2.5, 2.5, 1.25), (1.5, 1.5, 0.75), (0.75, 0.75, 0.4), (0.0, 0.0, 0.0))


def band_split(volume: np.ndarray) -> list[np.ndarray]:
    """G_0(x), G_1(x) - G_0(x), ... (a width of 0 is the volume itself)."""
    out, coarser = [], np.zeros_like(volume)
    for sigma in BANDS:
        smooth = gaussian_smooth(volume, sigma) if sigma[0] > 0 else volume
        out.append(smooth - coarser)
        coarser = smooth
    return out


def energy_ratio(pairs: np.ndarray, head: np.ndarray) -> list[float]:
    """Per band: head energy of the pairs' mean over that of their noise twin."""
    mean = pairs.mean(axis=0)
    twin = noise_twin(pairs.astype(np.float32)).astype(np.float64)
    return [float(np.sum(m[head] ** 2) / np.sum(t[head] ** 2)) for m, t in zip(band_split(mean), band_split(twin))]


def scan_rows(series: bench.Series, k: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Median S and null over the disjoint groups of k pairs."""
    pairs = np.asarray(series.item["pairs"], np.float64)
    null_pairs = pairs - pairs.mean(axis=0)[None]
    left = 1.0 - k / pairs.shape[0]
    signal, null = [], []
    for group in bench.groups_for(pairs.shape[0], k, groups):
        signal.append(energy_ratio(pairs[group], series.brain))
        null.append(np.asarray(energy_ratio(null_pairs[group], series.brain)) / left)
    return np.median(signal, axis=0), np.median(null, axis=0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, nargs="+", required=True, help="BIDS roots of real long scans")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--groups", type=int, default=8)
    args = parser.parse_args(argv)
    series, _ = load_real(args.real)
    widths = " / ".join(f"{s[0]:g}" for s in BANDS)
    print(f"| scan | k | S, bands {widths} | null, bands {widths} |")
    print("|---|---|---|---|")
    for k in args.ks:
        for s in series:
            signal, null = scan_rows(s, k, args.groups)
            name = s.name.split("/")[-1]
            print(
                f"| {name} | {k} | {' / '.join(f'{v:.2f}' for v in signal)} | {' / '.join(f'{v:.2f}' for v in null)} |"
            )


if __name__ == "__main__":
    main()
