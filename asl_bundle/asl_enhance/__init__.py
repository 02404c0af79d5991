"""The ASL bundle's own code: BIDS-ASL reading, transforms, networks, metrics and handlers.

It lives inside the bundle folder so the bundle alone is shareable; configs import it as
``asl_enhance`` (the bundle root is put on ``sys.path`` by MONAI's runner).
"""

from . import bids, handlers, metrics, networks, physics, smoothing, transforms

__all__ = ["bids", "handlers", "metrics", "networks", "physics", "smoothing", "transforms"]
