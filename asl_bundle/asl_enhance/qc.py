"""QC figure of one series: what the enhancement changed, at a glance.

Rows are maps (k-pair mean, enhanced, all-pair mean when more pairs exist, enhanced minus mean, the
enhanced map's SD when there is one), columns are representative axial slices. All deltaM rows share
one colour scale and all CBF rows another, so brightness differences between rows are real; the
difference row uses a symmetric diverging scale so that what the network added (red) or removed
(blue) stands out; each SD row has its own scale from zero.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .outputs import atomic_write  # noqa: E402
from .quantification import CBF_UNITS_TEXT  # noqa: E402

NUM_SLICES = 5


def representative_slices(mask: np.ndarray, count: int = NUM_SLICES) -> list[int]:
    """Evenly spaced slices through the central 70% of the slices that contain the mask."""
    occupied = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0)) if mask.any() else np.arange(mask.shape[-1])
    low, high = occupied[0], occupied[-1]
    span = high - low
    picks = np.linspace(low + 0.15 * span, high - 0.15 * span, min(count, span + 1 if span else 1))
    return sorted({int(round(p)) for p in picks})


def _limits(volumes: list[np.ndarray], mask: np.ndarray, percentile: float = 99.0) -> tuple[float, float]:
    """One colour range for several maps: from min(0, 1st percentile) to the top percentile in the mask."""
    values = np.concatenate([v[mask] for v in volumes]) if mask.any() else np.concatenate([v.ravel() for v in volumes])
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(min(0.0, np.percentile(values, 1))), float(np.percentile(values, percentile))
    return low, high if high > low else low + 1.0


def write_qc_figure(
    path: str | Path,
    title: str,
    deltam: dict[str, np.ndarray],
    cbf: dict[str, np.ndarray] | None = None,
    mask: np.ndarray | None = None,
    deltam_units: str = "scanner units",
    uncertainty: dict[str, np.ndarray] | None = None,
    noise: np.ndarray | None = None,
) -> Path:
    """Write the QC PNG atomically; ``deltam``/``cbf`` map row labels to 3D volumes in display order.

    The first two entries of ``deltam`` (k-pair mean, enhanced) also give the difference row.
    ``uncertainty`` maps labels to SD maps (``deltaM SD`` in deltaM units, ``CBF SD`` in CBF units),
    one row each, from zero. ``noise`` (the input's noise twin: one independent draw of the k-pair
    mean's noise) goes under the change row on the same scale, so a reader sees whether what the model
    removed looks like noise or like structure.
    """
    path = Path(path)
    first = next(iter(deltam.values()))
    mask = np.ones(first.shape, bool) if mask is None or not np.any(mask) else np.asarray(mask, bool)
    slices = representative_slices(mask)
    groups: list[tuple[str, dict[str, np.ndarray], str, str]] = [("deltaM", deltam, "gray", deltam_units)]
    names = list(deltam)
    if len(names) >= 2:
        change = deltam[names[1]] - deltam[names[0]]
        level = float(np.abs(deltam[names[0]][mask]).mean()) or 1.0
        rms = 100 * float(np.sqrt(np.mean(change[mask] ** 2))) / level
        changes = {f"{names[1]} - {names[0]}\n(rms {rms:.1f}% of mean |dM|)": change}
        if noise is not None:
            noise_rms = 100 * float(np.sqrt(np.mean(noise[mask] ** 2))) / level
            changes[f"noise twin: what noise\nlooks like (rms {noise_rms:.1f}%)"] = noise
        groups.append(("change", changes, "RdBu_r", deltam_units))
    for label, sd in (uncertainty or {}).items():
        groups.append(("SD", {label: sd}, "magma", CBF_UNITS_TEXT if label.startswith("CBF") else deltam_units))
    if cbf:
        groups.append(("CBF", cbf, "viridis", CBF_UNITS_TEXT))
    rows = sum(len(g[1]) for g in groups)
    title_inches = 0.45 + 0.2 * (title.count("\n") + 1)  # room for every title line above the slice labels
    height = 2.0 * rows + title_inches - 0.15
    fig, axes = plt.subplots(rows, len(slices), figsize=(2.0 * len(slices) + 1.8, height), squeeze=False)
    fig.subplots_adjust(
        top=1 - title_inches / height, bottom=0.1 / height, left=0.1, right=0.9, hspace=0.08, wspace=0.03
    )
    deltam_range = _limits(list(deltam.values()), mask)
    row = 0
    for kind, maps, cmap, units in groups:
        if kind == "change":  # half the deltaM range: small changes look small, removed noise shows
            vmin, vmax = -0.5 * deltam_range[1], 0.5 * deltam_range[1]
        else:
            vmin, vmax = _limits(list(maps.values()), mask)
            if kind in ("CBF", "SD"):
                vmin = 0.0
        image = None
        for label, volume in maps.items():
            for col, z in enumerate(slices):
                ax = axes[row, col]
                image = ax.imshow(volume[:, :, z].T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"slice {z + 1}", fontsize=8)
            axes[row, 0].set_ylabel(f"{kind}\n{label}", fontsize=8)
            row += 1
        bar = fig.colorbar(image, ax=axes[row - len(maps) : row, :].ravel().tolist(), shrink=0.9, pad=0.01)
        bar.set_label(f"{kind} ({units})", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90), suffix=".partial.png")
    finally:
        plt.close(fig)
    return path
