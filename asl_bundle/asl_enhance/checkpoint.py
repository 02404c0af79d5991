"""Training checkpoint that a killed run resumes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from .outputs import atomic_write


class ResumableCheckpoint:
    """Saves model, optimizer, scheduler and trainer state at every epoch end to one file, written
    atomically; with ``resume`` it restores them when training starts, so a run killed mid-epoch
    continues from its last completed epoch. (MONAI's CheckpointSaver cannot hold the trainer it is
    attached to from a config without a circular reference.) ``final_filename``: when training
    completes (never on an error, unlike CheckpointSaver's ``save_final``), the network's weights
    alone go there too, so a finished schedule is the model."""

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        resume: bool = False,
        filename: str = "checkpoint.pt",
        enabled: bool = True,
        final_filename: str | None = None,
    ):
        self.path = Path(save_dir) / filename
        self.final_path = Path(save_dir) / final_filename if final_filename else None
        self.objects: dict[str, Any] = {"model": network, "optimizer": optimizer}
        if lr_scheduler is not None:
            self.objects["lr_scheduler"] = lr_scheduler
        self.resume, self.enabled = resume, enabled

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
            if self.final_path is not None:
                engine.add_event_handler(Events.COMPLETED, self.save_final)

    def load(self, engine: Engine | None = None) -> None:
        """Restore every object from the checkpoint file (clear error when it is missing)."""
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no checkpoint to resume from")
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        trainer = self.objects["trainer"]
        max_epochs = trainer.state.max_epochs  # the command's value wins over the checkpoint's
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        if max_epochs is not None:
            trainer.state.max_epochs = max_epochs
        done = trainer.state.iteration // max(1, trainer.state.epoch_length or 1)
        print(f"Resumed from {self.path} after epoch {done} of {trainer.state.max_epochs}", flush=True)

    def save(self, engine: Engine) -> None:
        atomic_write(self.path, lambda tmp: torch.save({k: o.state_dict() for k, o in self.objects.items()}, tmp))

    def save_final(self, engine: Engine) -> None:
        assert self.final_path is not None
        atomic_write(self.final_path, lambda tmp: torch.save(self.objects["model"].state_dict(), tmp))
