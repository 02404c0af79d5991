"""BIDS-ASL reader: the one place that knows how series, contexts, sidecars and M0 are stored.

Every problem with an input raises :class:`ASLInputError` naming the file and what is wrong, so a
batch run can report it in one line and go on with the other series.

Why the reader checks more than the format: each check below stands where the alternative was a wrong
map written with exit status 0, a traceback from deep inside a library, or a batch that hangs.

- Only regular files are opened (a FIFO named ``*_asl.nii.gz`` blocks ``open`` forever); sidecars
  are read up to :data:`MAX_SIDECAR_BYTES` and :data:`MAX_SIDECAR_DEPTH` levels of nesting.
- Images must be finite, below :data:`MAX_ABS_INTENSITY` in magnitude (float32 arithmetic on larger
  values overflows downstream) and have an invertible voxel-to-world affine (outputs need one).
- The ASL volumes must carry signal (not constant; not every control equal to its label).
- M0 must be positive in the head (zero M0 gives zero CBF, negative M0 flips its sign).
- The control/label order must agree with the data (see :func:`pair_order_statistic`).
- A separate M0 on another voxel grid is brought onto the ASL grid (see :func:`m0_on_asl_grid`).

What the reader assumed about usable data is kept in :attr:`ASLSeries.notes`, for the sidecars.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import stat
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
#: largest sidecar read: real ones are a few kB, and reading an arbitrary huge file costs memory and time
MAX_SIDECAR_BYTES = 10 * 1024 * 1024
#: deepest nesting accepted in a sidecar: BIDS fields nest 2-3 levels; deeper JSON is not a sidecar
MAX_SIDECAR_DEPTH = 32
#: largest magnitude accepted in an image: its square summed over 10^7 voxels (the noise variances the
#: pipeline computes) stays below float32's 3.4e38; scanner data are many orders of magnitude smaller
MAX_ABS_INTENSITY = 1e15
#: |det| of the affine's 3x3 part relative to the product of its column lengths (1 for orthogonal voxel
#: axes, 0 for collinear or zero ones) below which the affine is singular and positions are undefined
MIN_AFFINE_ORTHOGONALITY = 1e-6
#: the M0 affine is the ASL's when every entry agrees within this (mm)
AFFINE_ATOL_MM = 1e-3
#: voxel centres closer than this fraction of a voxel are the same point (same grid, header-only change)
SAME_GRID_TOLERANCE_VOXELS = 0.1
#: a voxel is in the head for the input checks when its reference (M0, mean control or |mean deltaM|)
#: exceeds this fraction of the reference's 99th percentile
HEAD_FRACTION = 0.3
#: M0 is refused when more than this fraction of its head voxels are zero or negative
M0_MAX_NONPOSITIVE_FRACTION = 0.5
#: the control/label order is refused as swapped when the median pair's head-mean control - label is
#: below -SWAP_Z standard errors (so a series without perfusion, where the sign is noise, never is)
SWAP_Z = 5.0
#: ... and only when at least this share of the pairs is negative: a swapped order flips every pair, while a
#: subtraction offset of a series without perfusion (a phantom's, -0.08% of its control level in 4 of 7 pairs
#: of the Philips 3D run) changes sign from pair to pair
SWAP_MIN_NEGATIVE_SHARE = 0.75
#: fewer head voxels than this give no usable head mean: the swapped-order check is skipped
SWAP_MIN_HEAD_VOXELS = 32


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
    m0: np.ndarray | None  # (X, Y, Z), on the ASL grid
    affine: np.ndarray
    sidecar: dict[str, Any]
    volume_types: list[str]
    pair_volumes: list[tuple[int, ...]]  # volume indices (0-based) behind each pair
    m0_source: str  # "included", "separate" or "absent"
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the reader assumed or changed (for the sidecars)

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
    return _mark_duplicates(items)


def _mark_duplicates(items: list[dict[str, str]]) -> list[dict[str, str]]:
    """A series stored twice in one folder (``x_asl.nii`` beside ``x_asl.nii.gz``) would write the same
    outputs twice: each copy names the other (``duplicate``), and reading either refuses it."""
    by_series: dict[tuple[str, str], list[dict[str, str]]] = {}
    for item in items:
        by_series.setdefault((item["rel_dir"], item["stem"]), []).append(item)
    for copies in by_series.values():
        for item in copies if len(copies) > 1 else ():
            item["duplicate"] = next(c["asl"] for c in copies if c is not item)
    return items


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular_file(path: Path, what: str) -> None:
    """Refuse an existing path that is not a regular file, before anything opens it: opening a FIFO
    blocks until a writer appears (forever, in a batch), and no device or folder is an input file."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise ASLInputError(path, f"cannot inspect {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise ASLInputError(path, f"{what} is {kind}, not a regular file: not opened")


def read_aslcontext(path: str | Path) -> list[str]:
    """Volume types from an ``aslcontext.tsv`` (one column ``volume_type``), lower-cased."""
    path = Path(path)
    if not path.exists():
        raise ASLInputError(path, "aslcontext is missing (needed to tell control, label and M0 volumes apart)")
    _require_regular_file(path, "aslcontext")
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
    """The JSON sidecar as plain data (never evaluated); {} when absent and not required.

    Read at most :data:`MAX_SIDECAR_BYTES` and :data:`MAX_SIDECAR_DEPTH` deep: a sidecar nested
    200,000 deep made the JSON parser raise RecursionError, which named no file.
    """
    if not path or not Path(path).exists():
        if required:
            raise ASLInputError(path or "<sidecar>", "sidecar JSON is missing")
        return {}
    path = Path(path)
    _require_regular_file(path, "sidecar")
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_SIDECAR_BYTES + 1)
    except OSError as err:
        raise ASLInputError(path, f"cannot read sidecar ({err})") from None
    if len(raw) > MAX_SIDECAR_BYTES:
        raise ASLInputError(path, f"sidecar is larger than {MAX_SIDECAR_BYTES // 2**20} MB: not a sidecar, not read")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ASLInputError(path, f"cannot read sidecar ({err})") from None
    except json.JSONDecodeError as err:
        raise ASLInputError(path, f"sidecar is not valid JSON (line {err.lineno}: {err.msg})") from None
    except RecursionError:
        raise ASLInputError(path, f"sidecar JSON is nested too deeply (more than {MAX_SIDECAR_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise ASLInputError(path, "sidecar JSON is not an object")
    if _json_depth(data) > MAX_SIDECAR_DEPTH:
        raise ASLInputError(path, f"sidecar JSON is nested too deeply (more than {MAX_SIDECAR_DEPTH} levels)")
    return data


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``{}`` is 1), without recursion."""
    depth, level = 0, [value]
    while any(isinstance(v, (dict, list)) for v in level):
        depth += 1
        level = [c for v in level if isinstance(v, (dict, list)) for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def form_pairs(
    volume_types: list[str], source: str | Path = "<aslcontext>", notes: list[str] | None = None
) -> list[tuple[int, ...]]:
    """Volume indices of each pair: the i-th control with the i-th label, in either order; a
    ``deltam`` volume is a pair by itself. Pairs are ordered by their first volume. With ``notes``, one
    control or label after every volume of the other kind (a scan stopped mid-pair), where every other
    pair's volumes are neighbours, is left out and noted; any other mismatch could pair the wrong
    volumes and is refused."""
    controls = [i for i, t in enumerate(volume_types) if t == "control"]
    labels = [i for i, t in enumerate(volume_types) if t == "label"]
    extra, other = (controls, labels) if len(controls) > len(labels) else (labels, controls)
    trailing = len(extra) == len(other) + 1 and (not other or extra[-1] > other[-1])
    if notes is not None and trailing and all(abs(a - b) == 1 for a, b in zip(extra, other)):
        kind = volume_types[extra[-1]]
        notes.append(f"{Path(source).name}: the last {kind} volume (index {extra[-1]}) has no partner: left out")
        extra.pop()
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
    """Image data (float32, scaling applied) and affine; corrupt files, non-finite or overflowing
    values and singular affines become ASLInputError."""
    path = Path(path)
    if not path.exists():
        raise ASLInputError(path, "file does not exist")
    _require_regular_file(path, "image")
    try:
        if path.name.endswith(".gz"):
            _check_gzip(path)
        image = nib.load(str(path))
        with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become Inf: refused below
            data = np.asarray(image.get_fdata(dtype=np.float32))
    except (
        OSError, EOFError, ValueError, OverflowError, MemoryError, zlib.error,
        nib.filebasedimages.ImageFileError, HeaderDataError,
    ) as err:  # fmt: skip
        raise ASLInputError(path, f"cannot read NIfTI ({type(err).__name__}: {err})") from None
    _check_intensities(path, data)
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_affine(path, affine)
    return data, affine


def _check_intensities(path: Path, data: np.ndarray) -> None:
    """Refuse NaN/Inf voxels and magnitudes above :data:`MAX_ABS_INTENSITY` (one pass when clean)."""
    if data.size == 0:
        return
    low, high = float(data.min()), float(data.max())  # NaN propagates into both
    if math.isfinite(low) and math.isfinite(high) and max(-low, high) <= MAX_ABS_INTENSITY:
        return
    finite = np.isfinite(data)
    if not finite.all():
        raise ASLInputError(path, f"{int(data.size - np.count_nonzero(finite))} voxels are NaN or Inf")
    huge = int(np.count_nonzero(np.abs(data) > MAX_ABS_INTENSITY))
    raise ASLInputError(
        path,
        f"{huge} voxels have magnitude above {MAX_ABS_INTENSITY:.0e} (largest {max(-low, high):.3g}): "
        "float32 arithmetic on them overflows",
    )


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """Refuse a non-finite or singular voxel-to-world affine (an all-zero sform, say): positions are
    undefined and no output could be written with it."""
    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise ASLInputError(path, "voxel-to-world affine (sform/qform) holds NaN or Inf")
    lengths = np.linalg.norm(linear, axis=0)
    if np.any(lengths == 0) or abs(np.linalg.det(linear)) <= MIN_AFFINE_ORTHOGONALITY * float(np.prod(lengths)):
        raise ASLInputError(
            path, "voxel-to-world affine (sform/qform) is singular (e.g. all zero): voxel positions are undefined"
        )


def parse_num_pairs(value: Any) -> int | None:
    """The pair count a user asked for: None (also "", "all", "none", "null") for every pair, else a whole
    number (2, "2" or 2.0); ValueError for anything else (2.5, "abc", True), never a silent rounding."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all", "none", "null")):
        return None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if number.is_integer():
            return int(number)
    raise ValueError(f"num_pairs must be a whole number of pairs (or 'all'), got {value!r}")


def load_asl_series(item: dict[str, str], num_pairs: int | None = None) -> ASLSeries:
    """Read a series found by :func:`find_asl_series` into pair differences, mean control and M0.

    ``num_pairs`` keeps only the first K pairs (to emulate a short scan on a long one); the signal
    and pair-order checks use every pair of the series, so they do not depend on K.
    """
    asl_path = item["asl"]
    if item.get("duplicate"):
        other = Path(item["duplicate"]).name
        raise ASLInputError(asl_path, f"{other} beside it holds the same series: keep one, the outputs would collide")
    volume_types = read_aslcontext(item["aslcontext"])
    notes: list[str] = []
    pairs_idx = form_pairs(volume_types, item["aslcontext"], notes)
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
    check_signal(data, volume_types, pairs_idx, asl_path)
    m0, m0_source = _load_m0(item, data, affine, volume_types, notes)
    order = pair_order_statistic(data, volume_types, pairs_idx, m0)
    _refuse_swapped_order(order, volume_types, item["aslcontext"], asl_path, notes)
    total_pairs = len(pairs_idx)
    averaged = acquired_pairs_per_pair(sidecar, total_pairs, item.get("sidecar") or asl_path, notes)
    if num_pairs is not None:
        if int(num_pairs) < 1:
            raise ASLInputError(asl_path, f"num_pairs must be positive, got {num_pairs}")
        if int(num_pairs) > len(pairs_idx):
            have = f"{len(pairs_idx)} pair" + ("s" if len(pairs_idx) != 1 else "")
            raise ASLInputError(asl_path, f"num_pairs={num_pairs} but the series has only {have}")
        pairs_idx = pairs_idx[: int(num_pairs)]
    pairs = np.stack([_pair_difference(data, idx, volume_types) for idx in pairs_idx]).astype(np.float32)
    control_mean = mean_control(data, volume_types, pairs_idx)
    extra = {"total_pairs": total_pairs, "pair_order": order, "pairs_averaged": averaged}
    return ASLSeries(pairs, control_mean, m0, affine, sidecar, volume_types, pairs_idx, m0_source, extra, notes)


def mean_control(data: np.ndarray, volume_types: list[str], pair_volumes: Sequence[Sequence[int]]) -> np.ndarray | None:
    """Mean of the control volumes of the given pairs (volume indices from :func:`form_pairs`);
    None for deltam-only series."""
    controls = [i for pair in pair_volumes for i in pair if volume_types[i] == "control"]
    return data[..., controls].mean(axis=-1) if controls else None


def _pair_difference(data: np.ndarray, idx: Sequence[int], volume_types: list[str]) -> np.ndarray:
    """control - label for a pair, or the deltam volume itself."""
    if len(idx) == 1:
        return data[..., idx[0]]
    a, b = idx
    return data[..., a] - data[..., b] if volume_types[a] == "control" else data[..., b] - data[..., a]


def check_signal(
    data: np.ndarray, volume_types: list[str], pair_volumes: Sequence[Sequence[int]], path: str | Path
) -> None:
    """Refuse a series whose pair volumes are constant, or whose every pair difference is zero: such a
    series has no perfusion signal, and enhancing it wrote all-zero maps with exit status 0."""
    used = sorted({i for pair in pair_volumes for i in pair})
    low = min(float(data[..., i].min()) for i in used)
    high = max(float(data[..., i].max()) for i in used)
    if low == high:
        raise ASLInputError(path, f"every ASL volume holds the same value ({low:g}) in every voxel: no signal")
    if not any(np.any(_pair_difference(data, idx, volume_types)) for idx in pair_volumes):
        raise ASLInputError(path, "every control volume equals its label (all pair differences are 0): no perfusion")


def check_m0(m0: np.ndarray, path: str | Path) -> None:
    """Refuse an M0 that is zero, or zero/negative in most of the head (the voxels where its magnitude
    exceeds :data:`HEAD_FRACTION` of its 99th percentile): CBF divides by M0, so it would be all zero
    or flip sign, and the network's guide would be empty or inverted."""
    magnitude = np.abs(m0)
    top = float(np.percentile(magnitude, 99)) if m0.size else 0.0
    if top == 0:
        where = "every voxel" if not np.any(magnitude) else "99% of voxels"
        raise ASLInputError(path, f"M0 is zero in {where}: nothing to scale deltaM by")
    head = magnitude > HEAD_FRACTION * top
    nonpositive = float(np.mean(m0[head] <= 0))
    if nonpositive > M0_MAX_NONPOSITIVE_FRACTION:
        raise ASLInputError(
            path, f"M0 is zero or negative in {nonpositive:.0%} of the head: sign-flipped or not a magnitude image"
        )


def _load_m0(item, data, affine, volume_types, notes: list[str]) -> tuple[np.ndarray | None, str]:
    """M0 from included ``m0scan`` volumes, else from a separate ``*_m0scan.nii[.gz]`` (brought onto
    the ASL grid when it is stored on another one)."""
    included = [i for i, t in enumerate(volume_types) if t == "m0scan"]
    if included:
        m0 = data[..., included].mean(axis=-1)
        check_m0(m0, item["asl"])
        if item.get("m0scan"):
            separate = Path(item["m0scan"]).name
            notes.append(f"M0 both in the series and as {separate}: the series' m0scan volumes are used")
        return m0, "included"
    m0_path = item.get("m0scan")
    if not m0_path:
        return None, "absent"
    m0, m0_affine = load_nifti(m0_path)
    if m0.ndim == 4:
        m0 = m0.mean(axis=-1)
    if m0.ndim != 3:
        raise ASLInputError(m0_path, f"M0 must be 3D (or 4D, averaged), got {m0.ndim}D {m0.shape}")
    check_m0(m0, m0_path)
    return m0_on_asl_grid(m0_path, m0, m0_affine, data.shape[:3], affine, notes), "separate"


def _grid_corners(shape: Sequence[int]) -> np.ndarray:
    """Homogeneous voxel coordinates (4, 8) of the corner voxel centres of a grid."""
    axes = [(0, n - 1) for n in shape]
    return np.array([[i, j, k, 1.0] for i in axes[0] for j in axes[1] for k in axes[2]]).T


def m0_on_asl_grid(
    path: str | Path,
    m0: np.ndarray,
    m0_affine: np.ndarray,
    shape: Sequence[int],
    affine: np.ndarray,
    notes: list[str],
) -> np.ndarray:
    """A separate M0 on the ASL voxel grid, or ASLInputError when the two do not overlap in world space.

    Why not refuse every other grid: M0 slabs shifted by a slice and headers rewritten by SPM are common
    in real data, and the tools users know resample the M0. In order of preference:

    - same shape, and every voxel centre within :data:`SAME_GRID_TOLERANCE_VOXELS` of the ASL's (the
      affines differ only in the header, e.g. qform/sform rounding or a tiny reorientation): used as is;
    - voxel centres that coincide with the ASL's after reindexing (a shifted slab, flipped or permuted
      axes): copied voxel for voxel, exactly;
    - otherwise trilinear interpolation in world space with MONAI's SpatialResample (MONAI is already a
      dependency; nibabel.processing and scipy.ndimage would add scipy to the bundle's requirements).

    ASL voxels outside the M0 get M0 0, which masks them out of CBF. Every case adds a note.
    """
    shape = tuple(int(n) for n in shape)
    name = Path(path).name
    if m0.shape == shape and np.allclose(m0_affine, affine, atol=AFFINE_ATOL_MM):
        return m0
    asl_to_m0 = np.linalg.solve(m0_affine, affine)  # ASL voxel -> M0 voxel
    if m0.shape == shape:
        corners = _grid_corners(shape)
        if np.abs(asl_to_m0 @ corners - corners)[:3].max() <= SAME_GRID_TOLERANCE_VOXELS:
            moved = float(np.linalg.norm(((m0_affine - affine) @ corners)[:3], axis=0).max())
            notes.append(
                f"{name}: header affine differs from the ASL's, but every voxel centre lies within {moved:.2g} mm"
                " of the ASL's (same voxel grid, header-only change such as a reorientation): used voxel for voxel"
            )
            return m0
    index = np.indices(shape).reshape(3, -1)
    coords = asl_to_m0[:3, :3] @ index + asl_to_m0[:3, 3:]
    limits = np.array(m0.shape, float)[:, None] - 0.5
    inside = np.all((coords > -0.5 - 1e-6) & (coords < limits + 1e-6), axis=0)
    if not inside.any():
        raise ASLInputError(
            path,
            f"M0 (grid {m0.shape}) does not overlap the ASL series (grid {shape}) in world space: check the two"
            " files' affines",
        )
    nearest = np.rint(coords)
    coverage = f"{inside.mean():.0%} of the ASL voxels lie inside the M0" + (
        "" if inside.all() else " (the others get M0 0: no CBF there)"
    )
    if np.abs(coords - nearest).max() <= SAME_GRID_TOLERANCE_VOXELS:
        out = np.zeros(int(np.prod(shape)), np.float32)
        out[inside] = m0[tuple(nearest[:, inside].astype(int))]
        notes.append(f"{name}: M0 stored on the ASL's voxel centres in another extent or order: copied; {coverage}")
        return out.reshape(shape)
    out = _resample_trilinear(m0, m0_affine, shape, affine) * inside.reshape(shape)
    notes.append(
        f"{name}: M0 on another grid ({m0.shape}): resampled onto the ASL grid by trilinear interpolation in world"
        f" space (MONAI SpatialResample); {coverage}"
    )
    return out.astype(np.float32)


def _resample_trilinear(m0: np.ndarray, m0_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray):
    """MONAI's world-space resampling (imported here: only this rare path needs torch)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    source = MetaTensor(torch.as_tensor(np.asarray(m0, np.float32))[None], affine=torch.as_tensor(m0_affine))
    resample = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float64)
    out = resample(source, dst_affine=torch.as_tensor(affine), spatial_size=shape)
    return np.asarray(out[0].detach().cpu().numpy(), np.float64)


def pair_order_statistic(
    data: np.ndarray, volume_types: list[str], pair_volumes: Sequence[Sequence[int]], m0: np.ndarray | None
) -> dict[str, Any] | None:
    """How control - label behaves inside the head, pair by pair; None without enough head voxels.

    The head is where the reference exceeds :data:`HEAD_FRACTION` of its 99th percentile; the reference
    is M0, else the mean control image, else (deltam-only series) the magnitude of the mean deltaM,
    which selects the head whatever the sign. Per pair: the head-mean difference and its z (mean over
    its standard error across head voxels). In real data control - label is positive in the head in
    nearly every pair; a median z far below 0 means the aslcontext's order is the wrong way round.
    """
    reference, name = _head_reference(data, volume_types, pair_volumes, m0)
    top = float(np.percentile(reference, 99))
    head = reference > HEAD_FRACTION * top if top > 0 else np.zeros(reference.shape, bool)
    count = int(np.count_nonzero(head))
    if count < SWAP_MIN_HEAD_VOXELS:
        return None
    values = data[head]  # (head voxels, volumes)
    diffs = np.stack([_pair_difference(values, idx, volume_types) for idx in pair_volumes], axis=1)
    means = diffs.mean(axis=0, dtype=np.float64)
    errors = diffs.std(axis=0, dtype=np.float64) / math.sqrt(count)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(errors > 0, means / errors, np.sign(means) * np.inf)
    z = np.nan_to_num(z, nan=0.0)
    level = float(reference[head].mean())
    return {
        "reference": name,
        "head_voxels": count,
        "pairs": len(pair_volumes),
        "negative_pairs": int(np.count_nonzero(means < 0)),
        "median_z": float(np.median(z)),
        "median_relative_difference": float(np.median(means) / level),
    }


def _head_reference(data, volume_types, pair_volumes, m0) -> tuple[np.ndarray, str]:
    if m0 is not None:
        return m0, "M0"
    control = mean_control(data, volume_types, pair_volumes)
    if control is not None:
        return control, "mean control"
    deltam = np.mean([_pair_difference(data, idx, volume_types) for idx in pair_volumes], axis=0)
    return np.abs(deltam), "|mean deltaM|"


def _refuse_swapped_order(
    order: dict[str, Any] | None, volume_types: list[str], aslcontext, asl_path, notes: list[str]
) -> None:
    """ASLInputError when :func:`pair_order_statistic` says control - label is negative in the head in most
    pairs: CBF would read negative and the enhanced map collapse (issue 18). A negative median in only some
    pairs is a series with little or no perfusion (a phantom's subtraction offset): kept, with a note."""
    if order is None or order["median_z"] >= -SWAP_Z:
        return
    evidence = (
        f"inside the head in {order['negative_pairs']} of {order['pairs']} pairs (median head mean "
        f"{order['median_relative_difference']:+.2%} of the {order['reference']} level, median z "
        f"{order['median_z']:.0f})"
    )
    if order["negative_pairs"] < SWAP_MIN_NEGATIVE_SHARE * order["pairs"]:
        notes.append(
            f"{Path(asl_path).name}: control - label is negative {evidence}, but not in most pairs as a swapped "
            "order would be: read as a series with little or no perfusion (a phantom, a subtraction offset); "
            "processed as given"
        )
        return
    if "control" not in volume_types:
        raise ASLInputError(asl_path, f"deltam is negative {evidence}: the volumes look like label - control")
    raise ASLInputError(aslcontext, f"control - label is negative {evidence}: the control/label order looks swapped")


def acquired_pairs_per_pair(sidecar: dict[str, Any], pairs_in_file: int, source: str | Path, notes: list[str]) -> float:
    """How many acquired pairs each pair (or deltaM volume) of the file averages: TotalAcquiredPairs over the
    pairs in the file (1 without the field). A scanner that exports averages gives fewer, cleaner volumes
    than it acquired; the network takes each as one pair's noise, so the sidecars say so (``notes``)."""
    total = sidecar_number(sidecar, "TotalAcquiredPairs", source)
    if total is None or pairs_in_file < 1:
        return 1.0
    if total < pairs_in_file:
        notes.append(
            f"sidecar TotalAcquiredPairs {total:g} is fewer than the {pairs_in_file} pairs in the file; "
            "read as one acquired pair per pair"
        )
        return 1.0
    averaged = total / pairs_in_file
    if averaged > 1:
        notes.append(
            f"sidecar TotalAcquiredPairs {total:g} over the {pairs_in_file} pair(s) in the file: each averages "
            f"{averaged:g} acquired pairs (the scanner's own averaging); num_pairs counts the file's pairs"
        )
    return averaged


def sidecar_number(sidecar: dict[str, Any], key: str, source: str | Path, default: float | None = None) -> float | None:
    """A numeric sidecar field, with a clear error when it is present but not a finite number."""
    if key not in sidecar or sidecar[key] is None:
        return default
    value = sidecar[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ASLInputError(source, f"sidecar field {key} must be a number, got {value!r}")
    return float(value)
