"""MONAI dictionary transforms that turn a BIDS-ASL series into network input and target.

Chain: ``LoadASLSeriesd`` (read pairs, M0) -> ``SelectPairsd`` (input pairs and target) ->
``NormalizeASLd`` (unit-free scale, guidance channel). ``scale`` restores scanner units on output.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from .bids import ASLInputError, load_asl_series, load_nifti, parse_num_pairs
from .fidelity import HAS_SCIPY, LESIONS, place_lesions, plant_lesions, solid_head
from .items import voxel_sizes
from .layout import InputLayout
from .metrics import MIN_REFERENCE_PAIRS

#: the network sees deltaM scaled so that its own mean inside the head is this value (about the
#: head mean of deltaM in percent of M0 in simulated and real scans, so losses keep their scale)
DELTAM_HEAD_LEVEL = 0.3
#: the deltaM level never falls below this fraction of its RMS inside the head (near-zero or
#: negative means: no perfusion, inverted label order), so the scale stays positive and finite
DELTAM_LEVEL_FLOOR = 0.05
#: voxels above this fraction of the guide's 99th percentile form the head mask
HEAD_MASK_FRACTION = 0.2
#: spatial shape of the placeholder arrays of a series that failed (``on_error="skip"``)
PLACEHOLDER_SHAPE = (2, 2, 2)
ON_ERROR = ("raise", "skip")


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def mark_failed(d: dict, err: Exception) -> dict:
    """Turn a data item into a failed one: ``error`` holds the one-line message and tiny placeholder
    arrays stand in for the series, so collation and the network still run; writers skip it."""
    shape = PLACEHOLDER_SHAPE
    d.update(
        error=str(err),
        pairs=np.zeros((1, *shape), np.float32),
        guide=np.zeros(shape, np.float32),
        guide_source="none",
        m0_source="absent",
        affine=np.eye(4),
        sidecar_json="{}",
        pair_volumes="[]",
        total_pairs=0,
        pairs_averaged=1.0,
        input_mean=np.zeros(shape, np.float32),
        input_pairs="[]",
        num_pairs_used=0,
        input_notes="[]",
    )
    for key in ("truth", "target", "other_mean", "target_noise_var", "pair_noise_var"):
        if isinstance(d.get(key), np.ndarray):
            d[key] = np.zeros(shape, np.float32)
    return d


class LoadASLSeriesd(MapTransform):
    """Read the series named by ``keys`` (default ``asl``) into ``pairs`` (P, X, Y, Z) and ``guide``.

    ``guide`` is M0 where the series has it, else the mean control image, else zeros; it sets the
    head mask and gives the network sharp anatomy. ``num_pairs`` keeps the first K pairs only (K < 1 or
    more than the series has is an input error). ``pld_block="longest"`` (evaluation) keeps only the
    pairs at a multi-PLD series' longest PLD (:func:`keep_longest_pld_block`), so input and reference
    pairs show the same perfusion. ``on_error="skip"`` turns an :class:`ASLInputError`
    into a failed item (see :func:`mark_failed`) instead of raising; ``error`` is "" otherwise.
    """

    def __init__(
        self,
        keys: KeysCollection = "asl",
        num_pairs: int | None = None,
        on_error: str = "raise",
        allow_missing_keys: bool = False,
        pld_block: str = "all",
    ):
        super().__init__(keys, allow_missing_keys)
        self.num_pairs = parse_num_pairs(num_pairs)
        self.on_error = _check_on_error(on_error)
        if pld_block not in ("all", "longest"):
            raise ValueError(f"pld_block must be 'all' or 'longest', got {pld_block!r}")
        self.pld_block = pld_block

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d["error"] = ""
        try:
            self._load(d)
        except ASLInputError as err:
            if self.on_error == "raise":
                raise
            mark_failed(d, err)
        return d

    def _load(self, d: dict) -> None:
        for _ in self.key_iterator(d):
            series = load_asl_series(d, self.num_pairs)
            guide, guide_source = _guide(series)
            d.update(
                pairs=series.pairs,
                guide=guide,
                guide_source=guide_source,
                m0_source=series.m0_source,
                affine=series.affine,
                sidecar_json=json.dumps(series.sidecar),
                pair_volumes=json.dumps(series.pair_volumes),
                total_pairs=series.extra["total_pairs"],
                pairs_averaged=series.extra["pairs_averaged"],
                input_notes=json.dumps(series.notes),
            )
            if self.pld_block == "longest":
                keep_longest_pld_block(d)
            if d.get("truth"):
                truth, _ = load_nifti(d["truth"])
                if truth.shape != series.pairs.shape[1:]:
                    raise ASLInputError(d["truth"], f"shape {truth.shape} does not match {series.pairs.shape[1:]}")
                d["truth"] = truth


def longest_pld_pairs(sidecar: Mapping[str, Any], pair_volumes: Sequence[Sequence[int]]) -> np.ndarray | None:
    """Indices of the pairs at a multi-PLD series' longest PLD (a pair's PLD: the longest of its
    volumes'); ``None`` where PostLabelingDelay is not one value per volume or all pairs share it."""
    pld = sidecar.get("PostLabelingDelay")
    if not isinstance(pld, list) or not pair_volumes or len(pld) <= max(max(v) for v in pair_volumes):
        return None
    per_pair = np.array([max(float(pld[i]) for i in v) for v in pair_volumes])
    if np.unique(per_pair).size < 2:
        return None
    return np.flatnonzero(per_pair == per_pair.max())


def keep_longest_pld_block(d: dict) -> None:
    """A loaded multi-PLD item reduced to its longest-PLD pairs, with a note; others unchanged."""
    volumes = json.loads(d["pair_volumes"])
    sidecar = json.loads(d["sidecar_json"])
    keep = longest_pld_pairs(sidecar, volumes)
    if keep is None or len(volumes) != np.shape(d["pairs"])[0]:
        return
    longest = max(float(sidecar["PostLabelingDelay"][i]) for i in volumes[int(keep[0])])
    note = f"multi-PLD: kept the {keep.size} pairs at the longest PLD ({longest:g} s) of {len(volumes)}"
    d["pairs"] = np.asarray(d["pairs"])[keep]
    d["pair_volumes"] = json.dumps([volumes[i] for i in keep])
    d["input_notes"] = json.dumps([*json.loads(d.get("input_notes", "[]")), note])


def _guide(series) -> tuple[np.ndarray, str]:
    if series.m0 is not None:
        return series.m0.astype(np.float32), "m0"
    if series.control_mean is not None:
        return series.control_mean.astype(np.float32), "control"
    return np.zeros(series.pairs.shape[1:], np.float32), "none"


class SelectPairsd(Randomizable, MapTransform):
    """Choose the input pairs of a series and build ``input_mean`` and the training target.

    mode ``random`` draws k in ``num_input_pairs`` (int or [low, high]) pairs at random (training);
    mode ``first`` takes the first k (evaluation, inference; ``None`` = all pairs); mode ``groups``
    returns a LIST of items, one per disjoint input group g (pairs [gK, (g+1)K), at most
    ``max_groups``, each leaving >= 2 reference pairs, else the item fails), marked ``input_group``, so
    evaluation can take the median over groups (MONAI's Compose maps the next transforms over the
    list and ``list_data_collate`` flattens it into one batch). target:
    ``other`` = mean of the pairs not in the input (Noise2Noise), ``all`` = mean of all pairs
    (Kim et al.), ``truth`` = the noise-free map, ``none`` = no target. ``target_noise_var`` is the
    variance of the ``other`` target's own noise, for noise-corrected scores. Items that already
    failed pass through untouched; ``on_error="skip"`` fails an item that has too few pairs.
    ``input_twin`` is the :func:`noise_twin` of the input pairs (absent for a single pair).
    ``num_pairs_key`` names an item field that, where present, sets k for that item (modes
    ``first`` and ``groups``; capped at the series' pairs), so one validation set can score every
    series at several k.
    """

    def __init__(
        self,
        keys: KeysCollection = "pairs",
        num_input_pairs: int | Sequence[int] | None = None,
        mode: str = "first",
        target: str = "none",
        on_error: str = "raise",
        allow_missing_keys: bool = False,
        max_groups: int = 4,
        num_pairs_key: str | None = None,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.on_error = _check_on_error(on_error)
        if mode not in ("first", "random", "groups"):
            raise ValueError(f"mode must be 'first', 'random' or 'groups', got {mode!r}")
        self.max_groups = max(1, int(max_groups))
        if target not in ("other", "all", "truth", "none"):
            raise ValueError(f"target must be other, all, truth or none, got {target!r}")
        if isinstance(num_input_pairs, Sequence) and not isinstance(num_input_pairs, str):
            self.k_range = (int(num_input_pairs[0]), int(num_input_pairs[-1]))
        else:
            self.k_range = None if num_input_pairs in (None, "", 0, "all") else (int(num_input_pairs),) * 2
        self.mode, self.target, self.num_pairs_key = mode, target, num_pairs_key
        self._k = 0
        self._order: np.ndarray | None = None

    def randomize(self, num_pairs: int) -> None:
        high = num_pairs if self.k_range is None else min(self.k_range[1], num_pairs - (self.target == "other"))
        low = min(high, num_pairs if self.k_range is None else self.k_range[0])
        self._k = int(self.R.randint(low, high + 1))
        self._order = self.R.permutation(num_pairs)

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        d = dict(data)
        if d.get("error"):
            return d
        try:
            if self.mode == "groups":
                return self._groups(d)
            self._select(d)
        except ASLInputError as err:
            if self.on_error == "raise":
                raise
            mark_failed(d, err)
        return d

    def num_groups(self, num_pairs: int, k: int) -> int:
        """How many disjoint K-pair input groups a series of ``num_pairs`` gives (0: too few pairs)."""
        if num_pairs - k < MIN_REFERENCE_PAIRS:
            return 0  # one reference pair has no spread: its noise could not be taken out of the score
        return min(self.max_groups, num_pairs // k)

    def _groups(self, d: dict) -> list[dict]:
        num_pairs = int(np.shape(next(d[key] for key in self.key_iterator(d)))[0])
        k = self._fixed_k(d, num_pairs)
        count = self.num_groups(num_pairs, k)
        if count == 0:
            message = (
                f"needs at least {k + MIN_REFERENCE_PAIRS} pairs ({k} as input, {MIN_REFERENCE_PAIRS} unused to score"
                f" against with their noise taken out), has {num_pairs}"
            )
            raise ASLInputError(d.get("asl", "<series>"), message)
        items = []
        for g in range(count):
            used = np.arange(g * k, (g + 1) * k)
            item = dict(d, input_group=g)
            self._select(item, (used, np.setdiff1d(np.arange(num_pairs), used)))
            items.append(item)
        return items

    def _select(self, d: dict, split: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        for key in self.key_iterator(d):
            pairs = np.asarray(d[key])
            used, rest = split if split is not None else self._split(pairs.shape[0], d)
            d["input_mean"] = pairs[used].mean(axis=0).astype(np.float32)
            twin = noise_twin(pairs[used])
            if twin is None:  # a single pair has no twin: the key is left out (None does not collate)
                d.pop("input_twin", None)
            else:
                d["input_twin"] = twin
            d["input_pairs"] = json.dumps([int(i) for i in used])
            d["num_pairs_used"] = len(used)
            if len(rest):
                d["other_mean"] = pairs[rest].mean(axis=0).astype(np.float32)
                variance = pairs[rest].var(axis=0, ddof=1) if len(rest) > 1 else np.zeros(pairs.shape[1:])
                d["target_noise_var"] = (variance / len(rest)).astype(np.float32)
                d["pair_noise_var"] = pairs.var(axis=0, ddof=1).astype(np.float32)
            if self.target != "none":
                d["target"] = self._target(d, pairs, rest)

    def _fixed_k(self, d: Mapping, num_pairs: int) -> int:
        """k of modes first and groups: the item's own (``num_pairs_key``), capped at what the series
        allows (all pairs, less one for the ``other`` target) so short series still validate; else
        the transform's, which is never capped (an impossible k is an input error)."""
        if self.num_pairs_key and d.get(self.num_pairs_key) is not None:
            return max(1, min(int(d[self.num_pairs_key]), num_pairs - (self.target == "other")))
        return num_pairs if self.k_range is None else self.k_range[0]

    def _split(self, num_pairs: int, d: Mapping) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "random":
            self.randomize(num_pairs)
            assert self._order is not None
            return np.sort(self._order[: self._k]), np.sort(self._order[self._k :])
        source = d.get("asl", "<series>")
        k = self._fixed_k(d, num_pairs)
        if k > num_pairs:
            raise ASLInputError(source, f"needs {k} input pairs but the series has {num_pairs}")
        if self.target == "other" and k >= num_pairs:
            raise ASLInputError(source, f"needs more than {k} pairs to score against unused pairs, has {num_pairs}")
        return np.arange(k), np.arange(k, num_pairs)

    def _target(self, d: dict, pairs: np.ndarray, rest: np.ndarray) -> np.ndarray:
        if self.target == "truth":
            if not isinstance(d.get("truth"), np.ndarray):
                raise ASLInputError(d.get("asl", "<series>"), "target 'truth' needs a noise-free deltaM (truth_dir)")
            return d["truth"].astype(np.float32)
        if self.target == "other":
            return d["other_mean"]
        return pairs.mean(axis=0).astype(np.float32)


class RandNoiseLeveld(Randomizable, MapTransform):
    """Training augmentation: with probability ``prob`` shrink the input's noise towards the
    noise-free ``truth`` by a factor drawn from ``factor_range`` (input = truth + f * noise), so the
    network also sees high-SNR inputs and learns to leave them sharp; the noise twin (``twin_key``)
    is scaled by the same factor. Needs ``truth``; without it
    (e.g. Noise2Noise training on real data) the item passes unchanged."""

    def __init__(
        self,
        keys: KeysCollection = "input_mean",
        truth_key: str = "truth",
        prob: float = 0.25,
        factor_range: Sequence[float] = (0.0, 1.0),
        twin_key: str = "input_twin",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.truth_key, self.prob, self.twin_key = truth_key, float(prob), twin_key
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))
        self._factor = 1.0

    def randomize(self, data: Any = None) -> None:
        apply = self.R.random_sample() < self.prob
        self._factor = float(self.R.uniform(*self.factor_range)) if apply else 1.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        truth = d.get(self.truth_key)
        if self._factor == 1.0 or not isinstance(truth, np.ndarray) or d.get("error"):
            return d
        for key in self.key_iterator(d):
            d[key] = (truth + self._factor * (np.asarray(d[key]) - truth)).astype(np.float32)
        if isinstance(d.get(self.twin_key), np.ndarray):  # the twin is pure noise: it shrinks alike
            d[self.twin_key] = (self._factor * d[self.twin_key]).astype(np.float32)
        return d


class PlantLesionsd(Randomizable, MapTransform):
    """Evaluation only: plant hypo- and hyperperfusion lesions into every pair of a long scan, each pair
    keeping its own noise (:func:`~asl_enhance.fidelity.plant_lesions`), so a scorer can ask how much of
    each lesion's contrast a method keeps (:class:`~asl_enhance.evaluation.ASLEvaluationWriter`'s ``cr_*``
    columns). ``per_type`` lesions of each kind in :data:`~asl_enhance.fidelity.LESIONS` go where the
    benchmark puts them (inside the head, apart, hypo- where perfusion is high). Positions depend on
    ``seed`` and the series only, so a rerun or another model meets the same lesions. Writes the planted
    ``pairs``, ``lesions`` (JSON: name, factor, radius, centre voxel) and ``lesion_tissue`` (the mask the
    lesions and their shells were placed and are measured in); failed items pass through."""

    def __init__(self, keys: KeysCollection = "pairs", per_type: int = 3, seed: int = 0, guide_key: str = "guide"):
        MapTransform.__init__(self, keys)
        if not HAS_SCIPY:
            raise ImportError("PlantLesionsd (evaluate_lesions.json) places lesions with scipy: pip install scipy")
        self.per_type, self.seed, self.guide_key = int(per_type), int(seed), guide_key
        self._rng = np.random.default_rng(seed)

    def randomize(self, data: Any = None) -> None:
        """Reseed from ``seed`` and the series (``data``: its name) and draw the placement generator."""
        self.set_random_state(seed=(self.seed + zlib.crc32(str(data).encode())) % 2**32)
        self._rng = np.random.default_rng(self.R.randint(2**31))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("error"):
            return d
        self.randomize(f"{d.get('rel_dir', '')}/{d.get('stem', d.get('asl', ''))}")
        voxel = voxel_sizes(d["affine"])
        for key in self.key_iterator(d):
            pairs = np.asarray(d[key], np.float32)
            mean = pairs.mean(axis=0)
            tissue = solid_head(guide_scale(np.asarray(d[self.guide_key]), mean)[1])
            lesions = place_lesions(mean, tissue, voxel, LESIONS, self.per_type, self._rng)
            d[key] = plant_lesions(pairs, lesions, voxel)
            d["lesions"] = json.dumps([[s.name, s.factor, s.radius, list(c)] for s, c in lesions])
            d["lesion_tissue"] = tissue.astype(np.float32)
        return d


def guide_scale(guide: np.ndarray, fallback: np.ndarray) -> tuple[float, np.ndarray]:
    """Level of the guide (mean inside the head) and the head mask; both homogeneous in scale,
    so scaling a series by c scales ``scale`` by c and leaves the mask unchanged."""
    reference = guide if np.any(guide > 0) else np.abs(fallback)
    top = float(np.percentile(reference, 99))
    if top <= 0:
        return 1.0, np.ones(guide.shape, bool)
    mask = reference > HEAD_MASK_FRACTION * top
    return float(reference[mask].mean(dtype=np.float64)), mask


def deltam_level(input_mean: np.ndarray, mask: np.ndarray) -> float:
    """Mean deltaM inside the head, the unit the network works in.

    Scaling by deltaM's own level, not the guide's, makes the enhancement equivariant to the
    deltaM/M0 ratio, which differs between scanners (M0 scaling, readout, PLD) and between subjects
    (global CBF): scaled by M0, a network learns the training cohort's ratio and pulls every other
    scan's level towards it. The mean is unbiased under zero-mean noise, so the unit does not
    depend on SNR; it is homogeneous of degree 1, so the output scales exactly with the input.
    """
    values = np.asarray(input_mean, np.float64)[mask]
    if values.size == 0:
        return 1.0
    rms = float(np.sqrt(np.mean(values**2)))
    level = max(float(values.mean()), DELTAM_LEVEL_FLOOR * rms)
    return level if level > 0 else 1.0


def noise_twin(pairs: np.ndarray) -> np.ndarray | None:
    """A perfusion-free image with the same noise statistics as the mean of ``pairs`` (K, X, Y, Z).

    A zero-sum combination of the pairs cancels the perfusion map and keeps only pair-to-pair noise;
    scaled so its weights' squared sum is 1/K, it has the K-pair mean's noise variance and spatial
    correlation (for independent pairs) but an independent realisation. It tells the network how
    noisy THIS scan is (level and texture), which a single mean image cannot: texture and correlated
    noise look alike. Signs alternate; an odd K ends in weights (1, 1, -2), so every pair (a corrupted
    one too) shows in the twin; ``None`` for K < 2.
    """
    pairs = np.asarray(pairs)
    k = pairs.shape[0]
    if k < 2:
        return None
    weights = np.resize(np.array([1.0, -1.0]), k)
    if k % 2:
        weights[-3:] = (1.0, 1.0, -2.0)
    weights /= np.sqrt(k * np.sum(weights**2))
    return np.tensordot(weights, pairs, axes=1).astype(np.float32)


def network_input(
    input_mean: Any, guide: Any, layout: InputLayout | None = None, twin: np.ndarray | None = None
) -> tuple[np.ndarray, float, np.ndarray]:
    """The network's ``image`` (C, X, Y, Z), the ``scale`` back to input units and the head mask,
    from a k-pair mean (scaled by :func:`deltam_level`), the guide and the :func:`noise_twin` of the
    input pairs with its flag channel (1 where a twin exists, k >= 2), as ``layout`` asks; one
    function, so per-scan adaptation builds inputs exactly as the pipeline does."""
    layout = layout or InputLayout()
    guide = np.asarray(guide)
    input_mean = np.asarray(input_mean)
    level, mask = guide_scale(guide, input_mean)
    scale = deltam_level(input_mean, mask) / DELTAM_HEAD_LEVEL
    channels = [input_mean / scale]
    if layout.use_guide:
        channels.append(guide / level)
    if layout.use_noise_twin:
        present = twin is not None
        channels.append(np.asarray(twin) / scale if present else np.zeros_like(input_mean))
        channels.append(np.full(input_mean.shape, float(present)))
    return np.stack(channels).astype(np.float32), float(scale), mask


class NormalizeASLd(MapTransform):
    """Build ``image`` (C, X, Y, Z): deltaM at a head mean of DELTAM_HEAD_LEVEL, then the channels
    ``layout`` asks for (see :func:`network_input`); ``label`` likewise from ``target``; ``mask`` the
    head; ``scale`` the factor that turns network output back into the input's units. A failed item
    gets zero placeholders."""

    def __init__(
        self,
        keys: KeysCollection = ("input_mean", "target", "other_mean", "truth"),
        layout: InputLayout | None = None,
        guide_key: str = "guide",
        twin_key: str = "input_twin",
        allow_missing_keys: bool = True,
    ):
        super().__init__(keys, allow_missing_keys)
        self.layout = layout or InputLayout()
        self.guide_key, self.twin_key = guide_key, twin_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("error"):
            shape = np.shape(d["input_mean"])
            d["image"] = np.zeros((self.layout.num_channels, *shape), np.float32)
            d["mask"] = np.zeros((1, *shape), np.float32)
            d["scale"] = np.float32(1.0)
            return d
        twin = d.get(self.twin_key)
        twin = twin if isinstance(twin, np.ndarray) else None
        d["image"], scale, mask = network_input(d["input_mean"], d[self.guide_key], self.layout, twin)
        if isinstance(d.get("target"), np.ndarray):
            d["label"] = (d["target"] / scale)[None].astype(np.float32)
        d["mask"] = mask[None].astype(np.float32)
        d["scale"] = np.float32(scale)
        return d


class RestoreScaled(MapTransform):
    """Multiply network output (normalised units) by ``scale`` to return to the input's units."""

    def __init__(self, keys: KeysCollection = "pred", scale_key: str = "scale", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scale_key = scale_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] * float(d[self.scale_key])
        return d
