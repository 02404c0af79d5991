"""Print pair-to-pair fluctuation statistics of BIDS-ASL series (real or simulated) side by side.

Usage: asl-noise-stats DIR_OR_FILES... where each argument is a *_asl.nii[.gz] file or a
directory searched for them (derivatives/ skipped). Used to check that the simulator's noise brackets
real scans: neighbour correlation, per-pair level spread, inside/background ratio and per-pair SNR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asl_sim.simulator import noise_statistics, read_bids_asl

COLUMNS = [
    ("std_head", "std_in", "{:.3g}"),
    ("std_background", "std_bg", "{:.3g}"),
    ("ratio_head_background", "in/bg", "{:.2f}"),
    ("corr_x_head", "cx_in", "{:.2f}"),
    ("corr_y_head", "cy_in", "{:.2f}"),
    ("corr_z_head", "cz_in", "{:.2f}"),
    ("corr_x_background", "cx_bg", "{:.2f}"),
    ("corr_y_background", "cy_bg", "{:.2f}"),
    ("corr_z_background", "cz_bg", "{:.2f}"),
    ("level_spread_percent", "level%", "{:.1f}"),
    ("gm_snr_per_pair", "SNR", "{:.2f}"),
    ("gm_deltam_over_m0_percent", "dM/M0%", "{:.2f}"),
    ("num_pairs", "pairs", "{}"),
]


def find_series(paths: list[Path]) -> list[Path]:
    """All *_asl.nii(.gz) files named or found under the given directories."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*_asl.nii*") if "derivatives" not in p.parts)
        else:
            found.append(path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    print("series".ljust(28) + "".join(name.rjust(8) for _, name, _ in COLUMNS))
    for series in find_series(args.paths):
        diffs, m0, _ = read_bids_asl(series)
        stats = noise_statistics(diffs, m0)
        row = "".join(fmt.format(stats[key]).rjust(8) for key, _, fmt in COLUMNS)
        print(series.name.replace("_asl.nii.gz", "")[:27].ljust(28) + row)


if __name__ == "__main__":
    main()
