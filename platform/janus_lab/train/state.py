"""Training state for torch distributed checkpointing (DCP), through a `Stateful` wrapper.

Optimizer state is sharded like the parameters, so every rank saves its own part; Ray Train
uploads each rank's files into the same checkpoint folder in the run's storage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful


@dataclass
class Progress:
    """Where training is: what a resumed run needs to continue with the same data."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch."""
    micro_batches_in_epoch: int = 0
    """Micro-batches of the current epoch this rank has consumed."""


class TrainState(Stateful):
    """Model, optimizer, scheduler, progress and RNG states of one rank."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int):
        self.model, self.optimizer, self.scheduler, self.rank = model, optimizer, scheduler, rank
        self.progress = Progress()

    def state_dict(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "progress": dict(vars(self.progress)),
            # RNG streams differ per rank, so each rank keeps its own under its own key.
            f"rng_rank{self.rank}": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": np.random.get_state(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        rng = state.get(f"rng_rank{self.rank}")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])

    def save(self, folder: str) -> None:
        """Writes this rank's shard of the state into `folder` (collective: all ranks call it)."""
        dcp.save({"train": self}, checkpoint_id=folder)

    def load(self, folder: str) -> None:
        """Restores the state from a checkpoint folder (collective)."""
        state = {"train": self}
        dcp.load(state, checkpoint_id=folder)
