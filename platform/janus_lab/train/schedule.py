"""Learning-rate schedule: linear warmup, then cosine decay to a floor (docs/design.md, "Training")."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at an optimizer step.

    Warmup rises linearly from 1/warmup to 1 over `warmup_steps` (step 0 already moves the
    weights), then a half cosine falls from 1 to `min_lr_ratio` at `total_steps`.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `warmup_cosine`; its state travels in checkpoints."""
    warmup = int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup, min_lr_ratio))
