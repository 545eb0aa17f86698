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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
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
    geometry: str = ""
    """Workers, micro-batch, global batch, seed and epoch order the position above counts in
    (`data_geometry`); empty in checkpoints written before it was recorded."""


def data_geometry(world_size: int, micro_batch_size: int, global_batch_size: int, seed: int,
                  order: str = "") -> str:
    """What a data position depends on: the same micro-batch count means the same samples only
    when all of these are the same.

    Args:
        order: what fixes the order of an epoch's rows (`stream.epoch_order_signature`).
    """
    geometry = (f"{world_size} workers x micro-batch {micro_batch_size}, global batch {global_batch_size}, "
                f"seed {seed}")
    return f"{geometry}; {order}" if order else geometry


class ResumeMismatchError(RuntimeError):
    """A checkpoint whose data position was counted in another geometry than this run's."""


class TrainState(Stateful):
    """Model, optimizer, scheduler, progress and RNG states of one rank.

    Args:
        trainable_only: keep only the trainable parameters (LoRA adapters); the frozen base is
            built again from its source on resume.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, trainable_only: bool = False):
        self.model, self.optimizer, self.scheduler, self.rank = model, optimizer, scheduler, rank
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        self.progress = Progress()

    def state_dict(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=self.options)
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
                       optim_state_dict=state["optimizer"], options=self.options)
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

    def load(self, folder: str, geometry: str = "") -> None:
        """Restores the state from a checkpoint folder (collective).

        Args:
            geometry: this run's `data_geometry`; a checkpoint that recorded another one is
                refused, since its data position would point at other samples.

        Raises:
            ResumeMismatchError: the geometries differ.
        """
        state = {"train": self}
        dcp.load(state, checkpoint_id=folder)
        saved = self.progress.geometry
        if geometry and saved and saved != geometry:
            raise ResumeMismatchError(
                f"checkpoint {folder} (step {self.progress.step}) was written by a run with {saved}; this run "
                f"has {geometry}. Its data position would not match: resume with the same "
                "train.num_workers, train.micro_batch_size, train.global_batch_size, train.seed, "
                "data.shuffle_seed, data.shuffle_window_rows and dataset, or start a new run (another `name`).")
        self.progress.geometry = geometry or saved
