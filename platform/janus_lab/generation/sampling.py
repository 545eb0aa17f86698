"""Classifier-free guidance and the choice of the next code (docs/design.md, "Classifier-free guidance").

Every image of a batch carries its own settings (guidance weights, temperature, top-k, top-p)
and its own random numbers, so one batch can mix requests freely.

Randomness: image j of a request with seed s draws, once, N uniforms from a CPU
`torch.Generator` seeded with `image_seed(s, j)`, and step t picks its code by inverse-CDF
sampling with the t-th of them. The draws therefore depend only on (s, j): not on the batch the
request shares, not on its `parallel_size`, not on the device; and the per-token step does no
RNG work at all (which keeps it capturable in a CUDA graph).
"""

from __future__ import annotations

import copy
import hashlib
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from janus_lab.settings import SamplingSettings


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image `index` of a request seeded with `seed`.

    Hashed rather than `seed + index`, so that request seeds 0 and 1 do not share images.
    """
    digest = hashlib.blake2b(f"janus-lab:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_uniforms(seed: int, index: int, num_steps: int) -> torch.Tensor:
    """The uniforms in [0, 1) image `index` of a request samples its `num_steps` codes with.

    Returns:
        (num_steps,) float64, on the CPU.
    """
    generator = torch.Generator(device="cpu").manual_seed(image_seed(seed, index))
    return torch.rand(num_steps, generator=generator, dtype=torch.float64)


def mix_guidance(cond: torch.Tensor, uncond: torch.Tensor, cfg_weight: torch.Tensor,
                 part: torch.Tensor | None = None, cfg_weight2: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance in float32.

    Text-to-image: `u + w * (c - u)`. Editing first folds the partial branch into the
    conditional one: `c = (full + w2 * part) / (1 + w2)`.

    Args:
        cond: (B, V) logits of the conditional (editing: full) rows.
        uncond: (B, V) logits of the unconditional rows.
        cfg_weight: (B, 1) guidance weight w.
        part: (B, V) logits of the partial rows (editing only).
        cfg_weight2: (B, 1) partial-branch weight w2 (editing only).

    Returns:
        (B, V) float32 guided logits.
    """
    cond, uncond = cond.float(), uncond.float()
    if part is not None:
        cond = (cond + cfg_weight2 * part.float()) / (1 + cfg_weight2)
    return uncond + cfg_weight * (cond - uncond)


def filter_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int | None = None) -> torch.Tensor:
    """Keeps, per row, the logits at least as large as the k-th largest (ties kept); -inf elsewhere.

    Args:
        logits: (B, V).
        top_k: (B,) int64; 0 (or >= V) means no limit for that row.
        max_k: the largest k in `top_k` after that mapping, if the caller knows it (reading it
            from a GPU tensor would stall the step).
    """
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    largest = torch.topk(logits, max_k or int(k.max()), dim=-1).values
    threshold = largest.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps, per row, the smallest set of most likely codes holding probability >= top_p.

    A code is dropped when the codes more likely than it already hold `top_p` (the most likely
    code is always kept); equal probabilities are ordered by code index, so the result is
    deterministic.

    Args:
        logits: (B, V).
        top_p: (B,) float; 1.0 means no limit for that row.
    """
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row b takes the first code whose cumulative probability exceeds u_b.

    The cumulative sum runs in float64, so the tail of a 16384-way distribution keeps its mass.

    Args:
        logits: (B, V), -inf for excluded codes.
        uniforms: (B,) float64 in [0, 1).

    Returns:
        (B,) int64 codes.
    """
    cdf = torch.softmax(logits.float(), dim=-1).double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    # right=True skips codes of zero probability (where the CDF does not rise). Only a target
    # rounded up to the total (u within 1e-16 of 1) could fall past the end: clamp it.
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@dataclass
class ImageSampling(SamplingSettings):
    """How one image picks its codes: its request's sampling settings and its randomness."""

    seed: int
    index: int
    """Which image of its request (selects its random stream)."""

    def __post_init__(self) -> None:
        # Built per image from a request `validate_request` already checked: no second check.
        pass


class GuidedSampler:
    """Turns the logits of every CFG row of a batch into the next code of every image.

    Args:
        images: per image, its settings.
        cond_rows: (I,) row holding each image's conditional (editing: full) logits.
        uncond_rows: (I,) row holding its unconditional logits.
        part_rows: (I,) row holding its partial logits, -1 for text-to-image images.
        num_steps: codes per image (N).
        device: where the logits live.
    """

    def __init__(self, images: Sequence[ImageSampling], cond_rows: Sequence[int], uncond_rows: Sequence[int],
                 part_rows: Sequence[int], num_steps: int, device: torch.device | str):
        def tensor(values, dtype):
            return torch.tensor(list(values), dtype=dtype, device=device)

        self.cond_rows = tensor(cond_rows, torch.long)
        self.uncond_rows = tensor(uncond_rows, torch.long)
        editing = [i for i, row in enumerate(part_rows) if row >= 0]
        self.edit_images = tensor(editing, torch.long) if editing else None
        self.part_rows = tensor([part_rows[i] for i in editing], torch.long)
        self.cfg_weight = tensor((s.cfg_weight for s in images), torch.float32).unsqueeze(-1)
        self.cfg_weight2 = tensor((images[i].cfg_weight2 for i in editing), torch.float32).unsqueeze(-1)
        temperature = tensor((s.temperature for s in images), torch.float32)
        self.num_images = len(images)
        self.greedy = temperature == 0
        self.all_greedy = bool(self.greedy.all())
        # Greedy images skip the division; 1 keeps their (unused) sampled branch finite.
        self.temperature = torch.where(self.greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
        top_k = [s.top_k or 0 for s in images]
        top_p = [1.0 if s.top_p is None else s.top_p for s in images]
        self.top_k = tensor(top_k, torch.long) if any(top_k) else None
        # Rows without a limit keep the whole vocabulary; min() with V happens in __call__.
        self.max_k = max(k if k > 0 else sys.maxsize for k in top_k)
        self.top_p = tensor(top_p, torch.float32) if any(p < 1 for p in top_p) else None
        if self.all_greedy:
            self.uniforms = None
        else:
            self.uniforms = torch.stack([draw_uniforms(s.seed, s.index, num_steps) for s in images]).to(device)

    def subset(self, keep: torch.Tensor, row_map: torch.Tensor) -> "GuidedSampler":
        """The sampler of the images `keep` (indices, increasing) alone, once the batch's rows are
        renumbered by `row_map` (old row -> new row, -1 for a row that left the batch)."""
        image_map = torch.full((self.num_images,), -1, dtype=torch.long, device=keep.device)
        image_map[keep] = torch.arange(len(keep), device=keep.device)
        out = copy.copy(self)
        out.num_images = len(keep)
        out.cond_rows = row_map[self.cond_rows.index_select(0, keep)]
        out.uncond_rows = row_map[self.uncond_rows.index_select(0, keep)]
        if self.edit_images is not None:
            kept = image_map[self.edit_images] >= 0
            out.edit_images = image_map[self.edit_images[kept]] if bool(kept.any()) else None
            out.part_rows = row_map[self.part_rows[kept]]
            out.cfg_weight2 = self.cfg_weight2[kept]
        out.cfg_weight = self.cfg_weight.index_select(0, keep)
        out.temperature = self.temperature.index_select(0, keep)
        out.greedy = self.greedy.index_select(0, keep)
        out.all_greedy = bool(out.greedy.all())
        out.top_k = None if self.top_k is None else self.top_k.index_select(0, keep)
        out.top_p = None if self.top_p is None else self.top_p.index_select(0, keep)
        out.uniforms = None if self.uniforms is None else self.uniforms.index_select(0, keep)
        return out

    def guided_logits(self, row_logits: torch.Tensor) -> torch.Tensor:
        """(R, V) logits of every row -> (I, V) float32 guided logits of every image."""
        row_logits = row_logits.float()
        cond = row_logits.index_select(0, self.cond_rows)
        uncond = row_logits.index_select(0, self.uncond_rows)
        guided = mix_guidance(cond, uncond, self.cfg_weight)
        if self.edit_images is not None:
            # Editing images redo the mix with their partial branch folded in (elementwise work,
            # negligible next to the model step).
            edits = self.edit_images
            guided_edits = mix_guidance(cond.index_select(0, edits), uncond.index_select(0, edits),
                                        self.cfg_weight.index_select(0, edits),
                                        row_logits.index_select(0, self.part_rows), self.cfg_weight2)
            guided = guided.index_copy(0, edits, guided_edits)
        return guided

    def __call__(self, row_logits: torch.Tensor, step: int) -> torch.Tensor:
        """Picks the code of every image at `step`.

        Args:
            row_logits: (R, V) generation-head logits of every row.
            step: which code (0 .. N-1) is being chosen.

        Returns:
            (I,) int64 codes.
        """
        guided = self.guided_logits(row_logits)
        greedy_codes = guided.argmax(dim=-1)
        if self.all_greedy:
            return greedy_codes
        logits = guided / self.temperature
        if self.top_k is not None:
            logits = filter_top_k(logits, self.top_k, min(self.max_k, logits.shape[-1]))
        if self.top_p is not None:
            logits = filter_top_p(logits, self.top_p)
        sampled = sample_from_logits(logits, self.uniforms[:, step])
        return torch.where(self.greedy, greedy_codes, sampled)
