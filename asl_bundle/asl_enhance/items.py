"""What one engine iteration holds, as plain arrays: shared by the writers, the evaluation and the failure report."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ignite.engine import Engine


def to_numpy(value: Any) -> Any:
    """A tensor as a NumPy array; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def volume(value: Any) -> np.ndarray:
    """A 3D float32 volume from a (1, X, Y, Z) or (X, Y, Z) tensor/array."""
    arr = np.asarray(to_numpy(value), dtype=np.float32)
    return arr[0] if arr.ndim == 4 else arr


def voxel_sizes(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel edge lengths (mm) from an affine."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def batch_items(engine: Engine) -> list[dict]:
    """Each series of the iteration: its (decollated) batch data with the network output merged in."""
    batch, output = engine.state.batch, engine.state.output
    batch = batch if isinstance(batch, list) else [batch]
    output = output if isinstance(output, list) else [output]
    return [{**b, **o} for b, o in zip(batch, output)]
