"""The ASL bundle's own code: BIDS-ASL reading, transforms, network, metrics, physics and the ignite
handlers that write, score and checkpoint.

It lives inside the bundle folder so the bundle alone is shareable; configs import it as
``asl_enhance`` (the bundle root is put on ``sys.path`` by MONAI's runner).
"""

from . import (
    adaptation,
    bids,
    checkpoint,
    evaluation,
    failures,
    items,
    layout,
    metrics,
    networks,
    outputs,
    physics,
    quantification,
    smoothing,
    transforms,
    writers,
)

__all__ = [
    "adaptation",
    "bids",
    "checkpoint",
    "evaluation",
    "failures",
    "items",
    "layout",
    "metrics",
    "networks",
    "outputs",
    "physics",
    "quantification",
    "smoothing",
    "transforms",
    "writers",
]
