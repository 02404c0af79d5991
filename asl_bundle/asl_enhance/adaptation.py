"""Per-scan self-supervised adaptation (Noise2Noise on the scan's own pairs) at inference.

A scan with K >= 2 input pairs carries its own training signal: the mean of some of its pairs and the
mean of the others share the perfusion map but not the noise. ``ScanAdaptation`` fine-tunes a COPY of
the network on such splits for a bounded number of steps before the scan is enhanced, so the
network meets this scanner's noise texture; the shipped weights (and the loaded network) are never
changed. Only the pairs the input uses are touched, so evaluation against unused pairs stays fair.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from .layout import InputLayout
from .transforms import network_input, noise_twin

logger = logging.getLogger("asl_enhance")


class PerItemNetwork(torch.nn.Module):
    """Runs item i of a batch through network i (one adapted copy per series or input group)."""

    def __init__(self, networks: list[torch.nn.Module]):
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor, num_pairs: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] != len(self.networks):
            raise ValueError(f"batch of {x.shape[0]} items for {len(self.networks)} networks")
        return torch.cat(
            [
                net(x[i : i + 1], None if num_pairs is None else num_pairs.reshape(-1)[i : i + 1])
                for i, net in enumerate(self.networks)
            ]
        )


def noise2noise_splits(num_pairs: int, steps: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` random (input, target) splits of the pairs into two non-empty disjoint sets."""
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(steps):
        order = rng.permutation(num_pairs)
        k = int(rng.integers(1, num_pairs))
        splits.append((np.sort(order[:k]), np.sort(order[k:])))
    return splits


def adapt_network(
    network: torch.nn.Module,
    pairs: np.ndarray,
    guide: np.ndarray,
    steps: int,
    learning_rate: float = 1e-4,
    seed: int = 0,
    layout: InputLayout | None = None,
) -> torch.nn.Module:
    """A copy of ``network`` trained ``steps`` Adam steps on Noise2Noise splits of ``pairs`` (K, X, Y, Z):
    input = mean of some pairs (normalised as the pipeline does), target = mean of the others, MSE over
    the volume, random left-right flips as in training. Deterministic for a seed; ``network`` is untouched."""
    layout = layout or InputLayout()
    pairs = np.asarray(pairs, np.float32)
    guide = np.asarray(guide, np.float32)
    device = next(network.parameters()).device
    adapted = copy.deepcopy(network).to(device)
    adapted.train()
    optimizer = torch.optim.Adam(adapted.parameters(), lr=learning_rate)
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    rng = np.random.default_rng(seed + 1)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        for used, rest in noise2noise_splits(pairs.shape[0], steps, seed):
            key = tuple(used)
            if key not in cache:
                inputs = pairs[used]
                image, scale, _ = network_input(inputs.mean(axis=0), guide, layout, noise_twin(inputs))
                label = (pairs[rest].mean(axis=0) / scale)[None]
                cache[key] = (torch.as_tensor(image)[None], torch.as_tensor(label, dtype=torch.float32)[None])
            image, label = (t.to(device) for t in cache[key])
            if rng.random() < 0.5:
                image, label = image.flip(2), label.flip(2)
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(adapted(image), label)
            loss.backward()
            optimizer.step()
    adapted.eval()
    return adapted


def _value(batch: dict, key: str, index: int) -> Any:
    value = batch.get(key)
    if isinstance(value, (list, tuple)):
        return value[index]
    if isinstance(value, torch.Tensor):
        return value[index].detach().cpu().numpy()
    return value


class ScanAdaptation:
    """Ignite handler for the inference/evaluation engine: at ITERATION_STARTED it adapts a copy of
    ``engine.network`` to each series of the batch (its input pairs only; skipped for failed items and
    K < 2), swaps the copies in for this iteration and restores the original at ITERATION_COMPLETED.
    ``seconds`` keeps the adaptation time of every adapted item."""

    def __init__(
        self,
        steps: int = 20,
        learning_rate: float = 1e-4,
        seed: int = 0,
        layout: InputLayout | None = None,
    ):
        self.steps, self.learning_rate = int(steps), float(learning_rate)
        self.seed, self.layout = int(seed), layout or InputLayout()
        self.seconds: list[float] = []
        self._original: torch.nn.Module | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.adapt)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.restore)
        engine.add_event_handler(Events.COMPLETED, self.summary)

    def adapt(self, engine: Engine) -> None:
        batch = engine.state.batch
        if self.steps <= 0 or not isinstance(batch, dict) or "pairs" not in batch:
            return
        original = engine.network  # type: ignore[attr-defined]
        count = len(batch["pairs"])
        networks, changed = [], False
        for i in range(count):
            used = json.loads(_value(batch, "input_pairs", i) or "[]")
            if _value(batch, "error", i) or len(used) < 2:
                networks.append(original)
                continue
            start = time.perf_counter()
            pairs = np.asarray(_value(batch, "pairs", i))[used]
            networks.append(
                adapt_network(
                    original,
                    pairs,
                    _value(batch, "guide", i),
                    self.steps,
                    self.learning_rate,
                    self.seed,
                    self.layout,
                )
            )
            self.seconds.append(time.perf_counter() - start)
            changed = True
        if changed:
            self._original = original
            engine.network = PerItemNetwork(networks)  # type: ignore[attr-defined]

    def restore(self, engine: Engine) -> None:
        if self._original is not None:
            engine.network = self._original  # type: ignore[attr-defined]
            self._original = None

    def summary(self, engine: Engine | None = None) -> None:
        if self.seconds:
            print(
                f"Adapted {len(self.seconds)} inputs ({self.steps} steps each): "
                f"{float(np.mean(self.seconds)):.1f} s per input on average"
            )
