"""The bundle's version, read from its one source: ``configs/metadata.json``.

Imported without the rest of the package (no torch), so packaging (pyproject.toml), the deploy app
and the writers' sidecars all read the same number.
"""

from __future__ import annotations

import json
from pathlib import Path

METADATA = Path(__file__).resolve().parents[1] / "configs" / "metadata.json"


def bundle_version(metadata: Path = METADATA) -> str:
    """``version`` of a bundle's metadata.json."""
    return str(json.loads(metadata.read_text(encoding="utf-8"))["version"])


__version__ = bundle_version()
