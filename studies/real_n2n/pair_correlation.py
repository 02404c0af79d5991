"""Noise correlation between pairs of the real long scans, by distance in acquisition order (study only).

Noise2Noise needs the target's noise independent of the input's. The residual of each pair about the
all-pair mean, inside the head, is correlated with the residual of the pair ``lag`` later; the median
over pairs is printed per scan for lags 1, 2 and 5 (the residuals' own mean correlation for independent
noise is -1/(n - 1), about -0.02 to -0.14 here).

    python studies/real_n2n/pair_correlation.py
"""

from __future__ import annotations

import numpy as np

from asl_bench import fidelity as fd

LAGS = (1, 2, 5)


def lag_correlation(pairs: np.ndarray, head: np.ndarray, lag: int) -> float:
    resid = (pairs - pairs.mean(axis=0))[:, head]
    values = [np.corrcoef(resid[i], resid[i + lag])[0, 1] for i in range(len(resid) - lag)]
    return float(np.median(values))


def main() -> None:
    print("| scan | pairs | " + " | ".join(f"lag {lag}" for lag in LAGS) + " | independent |")
    print("|---|---|" + "---|" * (len(LAGS) + 1))
    for s in fd.study_series():
        pairs = s.item["pairs"]
        cells = " | ".join(f"{lag_correlation(pairs, s.brain, lag):+.3f}" for lag in LAGS)
        print(f"| {s.name.split('/')[1]} | {len(pairs)} | {cells} | {-1 / (len(pairs) - 1):+.3f} |")


if __name__ == "__main__":
    main()
