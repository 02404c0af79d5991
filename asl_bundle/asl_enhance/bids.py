"""BIDS-ASL reader: the one place that knows how series, contexts, sidecars and M0 are stored.

Every problem with an input raises :class:`ASLInputError` naming the file and what is wrong, so a
batch run can report it in one line and go on with the other series.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

VOLUME_TYPES = ("control", "label", "m0scan", "deltam", "cbf", "norf")
ASL_SUFFIXES = ("_asl.nii.gz", "_asl.nii")


class ASLInputError(ValueError):
    """An input file is missing, unreadable or inconsistent; the message names the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{path}: {self.problem}")


@dataclass
class ASLSeries:
    """An ASL series read into memory: pair differences, M0 and the metadata needed downstream."""

    pairs: np.ndarray  # (P, X, Y, Z) control - label (or given deltam), float32
    control_mean: np.ndarray | None  # (X, Y, Z)
    m0: np.ndarray | None  # (X, Y, Z)
    affine: np.ndarray
    sidecar: dict[str, Any]
    volume_types: list[str]
    pair_volumes: list[tuple[int, ...]]  # volume indices (0-based) behind each pair
    m0_source: str  # "included", "separate" or "absent"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])


def series_stem(asl_path: str | Path) -> str:
    """Input name without ``_asl.nii[.gz]``: the prefix of every output of the series."""
    name = Path(asl_path).name
    for suffix in ASL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ASLInputError(asl_path, "not an ASL series name (expected *_asl.nii or *_asl.nii.gz)")


def _sibling(asl_path: Path, suffix: str) -> Path:
    return asl_path.with_name(series_stem(asl_path) + suffix)


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def find_asl_series(
    dataset_dir: str | Path, truth_dir: str | Path | None = None, include_incomplete: bool = False
) -> list[dict[str, str]]:
    """List every ``*_asl.nii[.gz]`` with a sibling ``*_aslcontext.tsv`` as a MONAI data item.

    ``derivatives`` folders are skipped. ``truth_dir`` (a simulator's derivatives folder) adds the
    noise-free deltaM of each series under the key ``truth`` when present. ``include_incomplete``
    lists series without an aslcontext too, so that reading them reports the missing file.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ASLInputError(root, "data set folder does not exist")
    items = []
    for asl in sorted(root.rglob("*_asl.nii*")):
        rel = asl.relative_to(root)
        if "derivatives" in rel.parts or not asl.name.endswith(ASL_SUFFIXES):
            continue
        context = _sibling(asl, "_aslcontext.tsv")
        if not context.exists() and not include_incomplete:
            continue
        item = {
            "asl": str(asl),
            "aslcontext": str(context),
            "sidecar": str(_sibling(asl, "_asl.json")),
            "m0scan": str(_first_existing(_sibling(asl, "_m0scan.nii.gz"), _sibling(asl, "_m0scan.nii")) or ""),
            "rel_dir": str(rel.parent),
            "stem": series_stem(asl),
            "dataset_dir": str(root),
        }
        if truth_dir is not None:
            truth = Path(truth_dir) / rel.parent / f"{item['stem']}_desc-truth_deltam.nii.gz"
            if truth.exists():
                item["truth"] = str(truth)
        items.append(item)
    return items


def read_aslcontext(path: str | Path) -> list[str]:
    """Volume types from an ``aslcontext.tsv`` (one column ``volume_type``), lower-cased."""
    path = Path(path)
    if not path.exists():
        raise ASLInputError(path, "aslcontext is missing (needed to tell control, label and M0 volumes apart)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ASLInputError(path, f"cannot read aslcontext ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ASLInputError(path, "aslcontext is not UTF-8 text") from None
    # BIDS TSV has no quoting: a stray '"' must not swallow the next line into its value
    reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = [r for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise ASLInputError(path, "aslcontext is empty")
    header = [c.strip().lower() for c in rows[0]]
    if "volume_type" not in header:
        raise ASLInputError(path, f"aslcontext has no 'volume_type' column (header: {rows[0]})")
    column = header.index("volume_type")
    types = []
    for line, row in enumerate(rows[1:], start=2):
        value = row[column].strip().lower() if column < len(row) else ""
        if value not in VOLUME_TYPES:
            raise ASLInputError(path, f"line {line}: unknown volume type {value!r} (expected one of {VOLUME_TYPES})")
        types.append(value)
    if not types:
        raise ASLInputError(path, "aslcontext lists no volumes")
    return types


def read_sidecar(path: str | Path | None, required: bool = False) -> dict[str, Any]:
    """The JSON sidecar as plain data (never evaluated); {} when absent and not required."""
    if not path or not Path(path).exists():
        if required:
            raise ASLInputError(path or "<sidecar>", "sidecar JSON is missing")
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as err:
        raise ASLInputError(path, f"cannot read sidecar ({err})") from None
    except json.JSONDecodeError as err:
        raise ASLInputError(path, f"sidecar is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise ASLInputError(path, "sidecar JSON is not an object")
    return data


def form_pairs(volume_types: list[str], source: str | Path = "<aslcontext>") -> list[tuple[int, ...]]:
    """Volume indices of each pair: the i-th control with the i-th label, in either order; a
    ``deltam`` volume is a pair by itself. Pairs are ordered by their first volume."""
    controls = [i for i, t in enumerate(volume_types) if t == "control"]
    labels = [i for i, t in enumerate(volume_types) if t == "label"]
    if len(controls) != len(labels):
        raise ASLInputError(source, f"{len(controls)} control but {len(labels)} label volumes: cannot form pairs")
    pairs: list[tuple[int, ...]] = list(zip(controls, labels))
    pairs += [(i,) for i, t in enumerate(volume_types) if t == "deltam"]
    if not pairs:
        raise ASLInputError(source, "no control/label pairs and no deltam volumes")
    return sorted(pairs, key=min)


def _check_gzip(path: Path) -> None:
    """Read a gzip stream to its end, so a truncated or corrupt file (bad CRC) is caught even
    where nibabel would stop reading before the damage."""
    with gzip.open(path, "rb") as stream:
        while stream.read(1 << 24):
            pass


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Image data (float32, scaling applied) and affine; corrupt files become ASLInputError."""
    path = Path(path)
    if not path.exists():
        raise ASLInputError(path, "file does not exist")
    try:
        if path.name.endswith(".gz"):
            _check_gzip(path)
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (
        OSError, EOFError, ValueError, OverflowError, MemoryError, zlib.error,
        nib.filebasedimages.ImageFileError, HeaderDataError,
    ) as err:  # fmt: skip
        raise ASLInputError(path, f"cannot read NIfTI ({type(err).__name__}: {err})") from None
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise ASLInputError(path, f"{bad} voxels are NaN or Inf")
    return data, np.asarray(image.affine, dtype=np.float64)


def _check_geometry(path: str | Path, shape: tuple[int, ...], affine: np.ndarray, ref_shape, ref_affine) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise ASLInputError(path, f"M0 shape {tuple(shape)} does not match the ASL series {tuple(ref_shape)}")
    if not np.allclose(affine, ref_affine, atol=1e-3):
        raise ASLInputError(path, "M0 affine does not match the ASL series")


def load_asl_series(item: dict[str, str], num_pairs: int | None = None) -> ASLSeries:
    """Read a series found by :func:`find_asl_series` into pair differences, mean control and M0.

    ``num_pairs`` keeps only the first K pairs (to emulate a short scan on a long one).
    """
    asl_path = item["asl"]
    volume_types = read_aslcontext(item["aslcontext"])
    pairs_idx = form_pairs(volume_types, item["aslcontext"])
    sidecar = read_sidecar(item.get("sidecar"))
    data, affine = load_nifti(asl_path)
    if data.ndim == 3 and len(volume_types) == 1:
        data = data[..., None]
    if data.ndim != 4:
        raise ASLInputError(asl_path, f"ASL series must be 4D (x, y, z, volumes), got {data.ndim}D {data.shape}")
    if data.shape[3] != len(volume_types):
        raise ASLInputError(
            item["aslcontext"], f"lists {len(volume_types)} volumes but {Path(asl_path).name} has {data.shape[3]}"
        )
    total_pairs = len(pairs_idx)
    if num_pairs is not None:
        if int(num_pairs) < 1:
            raise ASLInputError(asl_path, f"num_pairs must be positive, got {num_pairs}")
        if int(num_pairs) > len(pairs_idx):
            raise ASLInputError(asl_path, f"num_pairs={num_pairs} but the series has only {len(pairs_idx)} pairs")
        pairs_idx = pairs_idx[: int(num_pairs)]
    pairs = np.stack([_pair_difference(data, idx, volume_types) for idx in pairs_idx]).astype(np.float32)
    control_mean = mean_control(data, volume_types, pairs_idx)
    m0, m0_source = _load_m0(item, data, affine, volume_types)
    return ASLSeries(
        pairs, control_mean, m0, affine, sidecar, volume_types, pairs_idx, m0_source, {"total_pairs": total_pairs}
    )


def mean_control(data: np.ndarray, volume_types: list[str], pair_volumes: Sequence[Sequence[int]]) -> np.ndarray | None:
    """Mean of the control volumes of the given pairs (volume indices from :func:`form_pairs`);
    None for deltam-only series."""
    controls = [i for pair in pair_volumes for i in pair if volume_types[i] == "control"]
    return data[..., controls].mean(axis=-1) if controls else None


def _pair_difference(data: np.ndarray, idx: tuple[int, ...], volume_types: list[str]) -> np.ndarray:
    """control - label for a pair, or the deltam volume itself."""
    if len(idx) == 1:
        return data[..., idx[0]]
    a, b = idx
    return data[..., a] - data[..., b] if volume_types[a] == "control" else data[..., b] - data[..., a]


def _load_m0(item, data, affine, volume_types) -> tuple[np.ndarray | None, str]:
    """M0 from included ``m0scan`` volumes, else from a separate ``*_m0scan.nii[.gz]``."""
    included = [i for i, t in enumerate(volume_types) if t == "m0scan"]
    if included:
        return data[..., included].mean(axis=-1), "included"
    m0_path = item.get("m0scan")
    if not m0_path:
        return None, "absent"
    m0, m0_affine = load_nifti(m0_path)
    if m0.ndim == 4:
        m0 = m0.mean(axis=-1)
    _check_geometry(m0_path, m0.shape, m0_affine, data.shape[:3], affine)
    return m0, "separate"


def sidecar_number(sidecar: dict[str, Any], key: str, source: str | Path, default: float | None = None) -> float | None:
    """A numeric sidecar field, with a clear error when it is present but not a finite number."""
    if key not in sidecar or sidecar[key] is None:
        return default
    value = sidecar[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ASLInputError(source, f"sidecar field {key} must be a number, got {value!r}")
    return float(value)
