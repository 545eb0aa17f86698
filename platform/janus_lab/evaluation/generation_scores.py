"""Generation scores of a model on a held-out prompt set, under one sampling setting.

- `clip_t`: CLIP-T of text-to-image prompts, cosine(image, prompt), mean over every image;
- `clip_t_edit`: the same for editing prompts (the instruction against the output);
- `clip_i`: CLIP-I of editing prompts, cosine(output, input image), mean over every output and
  input image (high: the edit kept the input; a good edit balances it against the instruction).

A metric is left out when the prompt set has no prompt of its kind. A request that fails its
checks (a prompt over the token limit, an unreadable input image) is refused alone, with its
reason, and the others are scored.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from PIL import Image

from janus_lab.evaluation.clip import ClipScorer
from janus_lab.generation import GenerationEngine, GenerationRequest, GenerationResult


@dataclass
class GenerationScores:
    """Mean CLIP scores of one run over a prompt set (see the module docstring)."""

    metrics: dict[str, float]
    """`clip_t`, `clip_t_edit`, `clip_i` (those the prompt set has prompts for)."""
    images: int
    """Images generated."""
    results: list[GenerationResult | None]
    """Per request, its codes and images (for contact sheets and exports); None for a refused one."""
    refused: dict[int, str]
    """Request index -> why it was not generated."""


def with_settings(requests: Sequence[GenerationRequest], settings: Mapping[str, Any],
                  parallel_size: int | None = None) -> list[GenerationRequest]:
    """Copies of the requests with the given sampling fields (and images per prompt) set."""
    extra = {"parallel_size": parallel_size} if parallel_size else {}
    return [dataclasses.replace(request, **settings, **extra) for request in requests]


def score_generation(engine: GenerationEngine, requests: Sequence[GenerationRequest], scorer: ClipScorer,
                     batch_images: int = 16) -> GenerationScores:
    """Generates every request (batched) and scores the images with CLIP; a bad request is refused alone.

    Raises:
        GenerationRequestError: no requests.
    """
    refused: dict[int, str] = {}
    results: list[GenerationResult | None] = [None] * len(requests)
    for index, result in engine.generate_in_batches(requests, max_images=batch_images,
                                                    on_refused=lambda i, err: refused.__setitem__(i, str(err))):
        results[index] = result
    t2i_images, t2i_texts, edit_images, edit_texts, outputs, inputs = [], [], [], [], [], []
    for request, result in zip(requests, results):
        if result is None:
            continue
        if request.task == "t2i":
            t2i_images += result.images
            t2i_texts += [request.prompt] * len(result.images)
            continue
        edit_images += result.images
        edit_texts += [request.prompt] * len(result.images)
        for source in request.input_images:
            source = _open(source)
            outputs += result.images
            inputs += [source] * len(result.images)
    metrics = {}
    for name, values in (("clip_t", scorer.clip_t(t2i_images, t2i_texts)),
                         ("clip_t_edit", scorer.clip_t(edit_images, edit_texts)),
                         ("clip_i", scorer.clip_i(outputs, inputs))):
        if values:
            metrics[name] = sum(values) / len(values)
    return GenerationScores(metrics=metrics, images=len(t2i_images) + len(edit_images), results=results,
                            refused=refused)


def _open(image: Image.Image | bytes) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(io.BytesIO(bytes(image))).convert("RGB")
