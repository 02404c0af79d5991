"""What the network sees: one object shared by the transforms, the network and per-scan adaptation.

The channels are the k-pair mean deltaM, then (``use_guide``) the guide image (M0, else the mean
control image), then (``use_noise_twin``) the noise twin of the input pairs and a flag that is 1 where
a twin exists (k >= 2). Keeping this in one place means the network sizes its own first layer and the
transforms build exactly the input it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputLayout:
    """The network input's channels (see the module docstring)."""

    use_guide: bool = True
    use_noise_twin: bool = True

    def __post_init__(self) -> None:  # configs may pass "false" strings from the command line
        object.__setattr__(self, "use_guide", _as_bool(self.use_guide))
        object.__setattr__(self, "use_noise_twin", _as_bool(self.use_noise_twin))

    @property
    def num_channels(self) -> int:
        """deltaM, [guide], [noise twin, twin-present flag]."""
        return 1 + int(self.use_guide) + 2 * int(self.use_noise_twin)

    @property
    def guide_channel(self) -> int | None:
        """Index of the guide; ``None`` without one."""
        return 1 if self.use_guide else None

    @property
    def twin_channel(self) -> int | None:
        """Index of the noise twin (its flag follows it); ``None`` without one."""
        return 1 + int(self.use_guide) if self.use_noise_twin else None


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        if value.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)
