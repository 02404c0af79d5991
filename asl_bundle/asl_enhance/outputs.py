"""Writing outputs safely: temporary name then rename, so a killed run never leaves a file that
looks finished, and output paths that can never leave the output folder."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
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
