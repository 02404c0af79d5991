"""Training augmentation: perfusion lesions that the anatomy does not show.

In the simulator, perfusion follows the anatomy (grey matter bright, white matter dark), so a network
trained on it learns to trust the guide and blurs over any perfusion edge the guide lacks: a
hypoperfused territory is filled in, a hyperperfused one flattened (issue 17: contrast recovery 0.66
for a planted radius-5 hypoperfusion at k = 2 on real scans). Planting random hypo- and hyperperfused
regions into the training series, in every pair alike, teaches it that such edges are real signal.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from .items import voxel_sizes


def ellipsoid_weight(
    shape: Sequence[int],
    centre: Sequence[float],
    radii: Sequence[float],
    angle: float,
    edge: float,
    units: Sequence[float],
) -> np.ndarray:
    """1 inside a rotated (in-plane) ellipsoid, 0 outside, a linear ramp ``edge`` voxels wide between.

    ``radii`` are in in-plane voxels; ``units`` the voxel size of each axis in in-plane voxels, so the
    shape is round in mm whatever the slice thickness.
    """
    x, y, z = (np.arange(n, dtype=np.float64) - c for n, c in zip(shape, centre))
    x, y, z = x[:, None, None] * units[0], y[None, :, None] * units[1], z[None, None, :] * units[2]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * x + sin * y, -sin * x + cos * y
    scaled = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (z / radii[2]) ** 2)
    distance = (scaled - 1.0) * float(np.mean(radii))  # approximate distance from the surface, voxels
    return np.clip(0.5 - distance / edge, 0.0, 1.0)


class RandPerfusionLesionsd(Randomizable, MapTransform):
    """Plant up to ``max_lesions`` hypo- or hyperperfused regions into a training series.

    Every pair becomes pair + (gain - 1) x base, where base is the noise-free ``truth`` when the item
    has one (else the all-pair mean), and the truth becomes gain x truth: each pair keeps its own
    noise, the noise twin (a zero-sum combination of pairs) is unchanged, and input and target agree.
    Each region is an ellipsoid (in-plane radius drawn from ``radius_range`` voxels, axes 0.6-1.4x,
    any in-plane angle, round in mm across slices) with a soft edge (``edge_range`` voxels), centred
    on a voxel with perfusion (base above ``min_level`` of its 99th percentile in the head); its gain
    is drawn from ``hypo_range`` or ``hyper_range`` with equal odds. With probability 1 - ``prob``
    the series is left alone, so the network still learns the unlesioned brain.
    """

    def __init__(
        self,
        keys: KeysCollection = "pairs",
        truth_key: str = "truth",
        affine_key: str = "affine",
        prob: float = 0.5,
        max_lesions: int = 4,
        radius_range: Sequence[float] = (1.5, 7.0),
        edge_range: Sequence[float] = (0.5, 2.0),
        hypo_range: Sequence[float] = (0.0, 0.7),
        hyper_range: Sequence[float] = (1.4, 2.2),
        min_level: float = 0.25,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.truth_key, self.affine_key = truth_key, affine_key
        self.prob, self.max_lesions, self.min_level = float(prob), int(max_lesions), float(min_level)
        self.radius_range, self.edge_range = tuple(radius_range), tuple(edge_range)
        self.hypo_range, self.hyper_range = tuple(hypo_range), tuple(hyper_range)
        self._lesions: list[dict] = []

    def randomize(self, candidates: np.ndarray) -> None:
        """Draw the lesions: centre index into ``candidates`` (N, 3), radii, angle, edge and gain."""
        self._lesions = []
        if self.R.random_sample() >= self.prob or len(candidates) == 0:
            return
        for _ in range(int(self.R.randint(1, self.max_lesions + 1))):
            radius = float(self.R.uniform(*self.radius_range))
            gain_range = self.hypo_range if self.R.random_sample() < 0.5 else self.hyper_range
            self._lesions.append(
                dict(
                    centre=candidates[int(self.R.randint(len(candidates)))],
                    radii=radius * self.R.uniform(0.6, 1.4, size=3),
                    angle=float(self.R.uniform(0.0, np.pi)),
                    edge=float(self.R.uniform(*self.edge_range)),
                    gain=float(self.R.uniform(*gain_range)),
                )
            )

    def gain_map(self, shape: Sequence[int], units: Sequence[float]) -> np.ndarray:
        """The multiplicative perfusion change of the drawn lesions (1 = none); overlaps multiply."""
        gain = np.ones(shape, np.float64)
        for lesion in self._lesions:
            weight = ellipsoid_weight(shape, lesion["centre"], lesion["radii"], lesion["angle"], lesion["edge"], units)
            gain *= 1.0 + (lesion["gain"] - 1.0) * weight
        return gain

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("error"):
            return d
        for key in self.key_iterator(d):
            pairs = np.asarray(d[key], np.float32)
            truth = d.get(self.truth_key)
            base = truth if isinstance(truth, np.ndarray) else pairs.mean(axis=0)
            positive = base[base > 0]
            top = float(np.percentile(positive, 99)) if positive.size else 0.0
            self.randomize(np.argwhere(base > self.min_level * top) if top > 0 else np.zeros((0, 3)))
            if not self._lesions:
                continue
            sizes = np.asarray(voxel_sizes(d.get(self.affine_key, np.eye(4))))
            gain = self.gain_map(base.shape, sizes / float(min(sizes[:2])))
            d[key] = (pairs + ((gain - 1.0) * base)[None]).astype(np.float32)
            if isinstance(truth, np.ndarray):
                d[self.truth_key] = (gain * truth).astype(np.float32)
        return d


class RandGuideDropoutd(Randomizable, MapTransform):
    """Training augmentation: with probability ``prob`` the series loses its guide, as a deltaM-only
    series (no M0, no control images) arrives: the guide becomes zeros and ``guide_source`` "none",
    exactly what :class:`~asl_enhance.transforms.LoadASLSeriesd` gives such a series. A network that
    never saw a missing guide reads those series 28-67% low (issue 18); with this it learns to enhance
    from deltaM alone."""

    def __init__(self, keys: KeysCollection = "guide", prob: float = 0.15, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prob = float(prob)
        self._drop = False

    def randomize(self, data: Any = None) -> None:
        self._drop = self.R.random_sample() < self.prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._drop or d.get("error"):
            return d
        for key in self.key_iterator(d):
            d[key] = np.zeros_like(np.asarray(d[key]), dtype=np.float32)
        d["guide_source"] = "none"
        return d
