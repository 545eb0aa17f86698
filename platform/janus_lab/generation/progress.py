"""Watching one request while its batch generates: partial images, and leaving early.

An autoregressive model writes an image code by code in raster order, so after row r of the
code grid is finished, the top r/side of the picture is settled. A request that asks for
`partial_images` k (0-3) gets k intermediate images, spread evenly over the rows: after
ceil(i * side / (k + 1)) rows for i = 1..k. A partial image shows the finished rows decoded and
the rest as flat grey.

The engine only hands the codes out (a copy, at most k times per request); decoding them is
the watcher's work, done off the decode loop, so a streaming request does not slow its batch.

A watcher that no longer wants the result (its client disconnected) sets `cancelled`; at the
next step the engine drops the request's rows from the batch (on the growing cache of the CPU
path; the static cache of CUDA graphs keeps its shapes, and so computes them to the end).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

MAX_PARTIAL_IMAGES = 3
"""What the OpenAI Images API allows for `partial_images`."""
PARTIAL_FILL = (128, 128, 128)
"""The colour of the rows not generated yet."""


def partial_rows(partial_images: int, side: int) -> list[int]:
    """Rows of the code grid finished at each partial image: k values in 1..side-1, increasing.

    Args:
        partial_images: k, 0..MAX_PARTIAL_IMAGES.
        side: rows (and columns) of the code grid.

    Raises:
        ValueError: k out of range.
    """
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise ValueError(f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, got {partial_images}")
    rows = sorted({min(side - 1, max(1, math.ceil(i * side / (partial_images + 1))))
                   for i in range(1, partial_images + 1)})
    return rows if side > 1 else []


@dataclass
class RequestProgress:
    """What a caller asks the engine about one request of a batch.

    Args:
        partial_images: intermediate images wanted (0-3).
        on_partial: called from the engine's thread with (partial index, codes (parallel_size, N)
            on the CPU, rows finished); codes past the finished rows are not meaningful.
        on_freed: called from the engine's thread with (step, rows) when a cancelled request's
            rows leave the batch.
    """

    partial_images: int = 0
    on_partial: Callable[[int, torch.Tensor, int], None] | None = None
    on_freed: Callable[[int, int], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def schedule(self, side: int) -> dict[int, tuple[int, int]]:
        """Decode step after which each partial image is due -> (partial index, rows finished)."""
        if self.on_partial is None:
            return {}
        return {rows * side - 1: (index, rows) for index, rows in enumerate(partial_rows(self.partial_images, side))}


def fill_unfinished(codes: torch.Tensor, rows: int) -> torch.Tensor:
    """Codes with every row past `rows` replaced by a copy of the last finished row, so the
    decoder (whose convolutions see neighbours) reads a plausible continuation, not garbage."""
    count, n = codes.shape
    side = math.isqrt(n)
    grid = codes.view(count, side, side).clone()
    grid[:, rows:] = grid[:, rows - 1:rows]
    return grid.view(count, n)
