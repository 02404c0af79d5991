"""Writing outputs safely: temporary name then rename, so a killed run never leaves a file that
looks finished; a series written whole into a private folder and then published; output paths that can
never leave the output folder; an output folder checked before any work.

What publishing a series guarantees (:func:`publish_series`): every file of a series is first written
into a hidden folder of its own inside the output folder (``.asl_tmp-<pid>-<random>/``), then moved
into place with one ``os.replace`` per file, the *marker* last. The marker (a JSON sidecar) lists the
series' other files, so "the marker exists and every file it lists exists" means the series was
published whole by one run; anything else is an incomplete series. A run that fails deletes only its
own folder and, during publishing, only the files it moved there itself (same inode). A run killed
with ``kill -9`` while publishing leaves files without their marker (incomplete, redone by
``--skip_existing``); its hidden folder and ``.partial`` files are removed by the next run
(:func:`remove_stale_temporaries`). Not guaranteed: two runs publishing the *same* series at the same
moment without ``--overwrite`` are each checked just before publishing, so one of them is refused,
except in the instant between that check and the moves, where the later run's files replace the
earlier's (each file always whole); and the folders must be on one file system (``os.replace``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def safe_output_path(output_dir: str | Path, rel_dir: str | Path, name: str) -> Path:
    """``output_dir/rel_dir/name``, refusing anything that would resolve outside ``output_dir``."""
    root = Path(output_dir).resolve()
    path = (root / rel_dir / name).resolve()
    if root != path and root not in path.parents:
        raise ValueError(f"output path {path} would leave the output folder {root}")
    return path


def atomic_write(path: Path, write: Callable[[str], Any], suffix: str = ".partial") -> None:
    """Write through ``write(tmp)`` to a hidden temporary name beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets a later run tell a dead run's leftover from a live run's file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain open would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_nifti(path: str | Path, volume: np.ndarray, affine: np.ndarray) -> None:
    """Write a float32 NIfTI with the given affine atomically."""
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(np.float32)
    image.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    atomic_write(Path(path), lambda tmp: nib.save(image, tmp), suffix=f".partial{suffix}")


def write_json(path: str | Path, content: Any) -> None:
    """Write JSON atomically."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(content, indent=2, default=_jsonable) + "\n", encoding="utf-8")

    atomic_write(Path(path), write)


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------------------ series: stage, then publish

#: name start of the hidden folder a run writes one series into before publishing it
STAGING_PREFIX = ".asl_tmp-"
#: key of the marker sidecar that lists the series' other files (see the module docstring)
SERIES_FILES_KEY = "SeriesOutputs"
_STAGING_OWNER = re.compile(rf"^{re.escape(STAGING_PREFIX)}(\d+)-")
_PARTIAL_OWNER = re.compile(r"\.(\d+)-[A-Za-z0-9_]+\.partial(\.|$)")


class OutputExistsError(FileExistsError):
    """An output of the series is already there and replacing it was not asked for."""

    def __init__(self, path: str | Path):
        super().__init__(errno.EEXIST, "output exists", str(path))


@contextlib.contextmanager
def stage_series(output_dir: str | Path) -> Iterator[Path]:
    """A new hidden folder inside ``output_dir`` that only this run writes to; removed on leaving,
    whatever happened (after publishing, what is left there was never published)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish_series(staged: Path, dest: Path, marker: str, replace: bool) -> list[Path]:
    """Move every file of ``staged`` into ``dest``, the JSON ``marker`` last after it has been given
    the list of the others (``SeriesOutputs``). Without ``replace`` a file already in ``dest`` refuses
    the whole series (:class:`OutputExistsError`, nothing moved); with it, the old marker is removed
    first, so the series reads as incomplete until the new one lands. On failure, the files this call
    moved are removed again, and only while they are still the ones it moved (same inode): a file
    another run put there meanwhile is left alone. Returns the published paths, marker last."""
    names = sorted(p.name for p in staged.iterdir() if p.is_file())
    if marker not in names:
        raise ValueError(f"{staged / marker}: the series' marker was not written")
    others = [n for n in names if n != marker]
    content = json.loads((staged / marker).read_text(encoding="utf-8"))
    write_json(staged / marker, {**content, SERIES_FILES_KEY: others})
    dest.mkdir(parents=True, exist_ok=True)
    if not replace:
        existing = next((dest / n for n in names if (dest / n).exists()), None)
        if existing is not None:
            raise OutputExistsError(existing)
    else:
        (dest / marker).unlink(missing_ok=True)
    moved: list[tuple[Path, tuple[int, int]]] = []
    try:
        for name in [*others, marker]:
            info = os.stat(staged / name)
            os.replace(staged / name, dest / name)
            moved.append((dest / name, (info.st_dev, info.st_ino)))
    except BaseException:
        for path, identity in reversed(moved):
            _unlink_if_same(path, identity)
        raise
    return [path for path, _ in moved]


def _unlink_if_same(path: Path, identity: tuple[int, int]) -> None:
    with contextlib.suppress(OSError):
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == identity:
            path.unlink()


def series_complete(dest: Path, marker: str) -> bool:
    """True when ``dest/marker`` lists the series' files and every one of them is there (a series
    published whole, see :func:`publish_series`); a marker without the list (older versions), an
    unreadable one or a missing file means incomplete."""
    try:
        listed = json.loads((dest / marker).read_text(encoding="utf-8")).get(SERIES_FILES_KEY)
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(listed, list) or not all(isinstance(n, str) and n == Path(n).name for n in listed):
        return False
    return all((dest / name).is_file() for name in listed)


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(output_dir: str | Path, started: float | None = None) -> int:
    """Remove what killed runs left in ``output_dir``: staging folders (``.asl_tmp-<pid>-*``) and hidden
    ``.partial`` files that are older than ``started`` (this run's start, default now) and whose pid is
    not a live process here (a ``.partial`` of an older version, without pid, counts as dead). A live
    run's files, and anything newer than this run, are left alone. Returns how many were removed."""
    root, started = Path(output_dir), time.time() if started is None else started
    if not root.is_dir():
        return 0
    removed = 0
    for folder, dirs, files in os.walk(root):
        for name in list(dirs):
            owner = _STAGING_OWNER.match(name)
            if owner is None:
                continue
            dirs.remove(name)  # never descend into a staging folder: it is whole or not ours
            if _stale(Path(folder, name), owner, started):
                shutil.rmtree(Path(folder, name), ignore_errors=True)
                removed += 1
        for name in files:
            if name.startswith(".") and ".partial" in name:
                path = Path(folder, name)
                if _stale(path, _PARTIAL_OWNER.search(name), started):
                    path.unlink(missing_ok=True)
                    removed += 1
    return removed


def _stale(path: Path, owner: re.Match | None, started: float) -> bool:
    try:
        older = path.lstat().st_mtime < started
    except OSError:
        return False
    return older and (owner is None or not _pid_alive(int(owner.group(1))))


# ------------------------------------------------------------------------------ the output folder


def output_dir_problem(output_dir: str | Path, dataset_dir: str | Path | None = None) -> str | None:
    """Why ``output_dir`` must not be written (one line), or None. Refused: the input data set
    itself or a folder inside it other than its ``derivatives/`` (where BIDS puts derivatives and the
    reader never looks), a folder whose ``dataset_description.json`` is not one this bundle wrote
    (it would be replaced), and a folder that cannot be created or written (checked by writing and
    deleting a probe file, so a read-only output fails now, not after every series has run)."""
    out = Path(output_dir).resolve()
    if dataset_dir is not None:
        data = Path(dataset_dir).resolve()
        if out == data or (data in out.parents and (data / "derivatives") not in out.parents):
            where = "is the input data set" if out == data else f"is inside the input data set {data}"
            return f"the output folder {where}: use a folder outside it, or {data}/derivatives/<name>"
    description = out / "dataset_description.json"
    if description.exists():
        reason = _foreign_description(description)
        if reason:
            return f"{description} {reason}: it would be replaced; choose another output folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".asl_probe-{os.getpid()}-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"the output folder cannot be written ({err.strerror or err})"
    return None


def _foreign_description(path: Path) -> str | None:
    """Why a ``dataset_description.json`` is not this bundle's own derivative description, or None."""
    try:
        content = json.loads(path.read_text(encoding="utf-8")[:1_000_000])
        generators = content.get("GeneratedBy") or []
        names = {g.get("Name") for g in generators if isinstance(g, dict)}
    except (OSError, ValueError, AttributeError):
        return "cannot be read as a BIDS dataset description"
    if content.get("DatasetType") != "derivative":
        return "describes a raw data set"
    if "asl_bundle" not in names:
        return f"belongs to another pipeline's derivatives ({', '.join(sorted(map(str, names))) or 'no GeneratedBy'})"
    return None
