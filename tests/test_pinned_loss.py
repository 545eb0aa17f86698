"""The debug model's losses for a fixed seed, pinned (tests/assets/losses/debug.json).

A change that moves these numbers changes what the model computes; if that is intended,
regenerate with `UPDATE_PINNED_LOSSES=1 pytest tests/test_pinned_loss.py` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from janus_lab.model import GenerationObjective, MaskDecision, SequenceBuilder, collate_samples, debug

ASSET = Path(__file__).parent / "assets" / "losses" / "debug.json"
STEPS = 6


def run_debug_steps() -> list[float]:
    bundle = debug(seed=0)
    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens)
    gen = torch.Generator().manual_seed(1234)
    codes = lambda: torch.randint(0, 16384, (bundle.num_image_tokens,), generator=gen).tolist()  # noqa: E731
    image = torch.rand(3, 64, 64, generator=gen) * 2 - 1
    samples = [
        builder.training_sample("a red circle on a blue background", codes()),
        builder.training_sample("a small green square", codes(), mask=MaskDecision(drop_text=True)),
        builder.training_sample("make the circle yellow", codes(), [codes()], MaskDecision(drop_images=(False,))),
        builder.training_sample("remove the star", codes(), [codes()], MaskDecision(drop_images=(True,))),
    ]
    batch = collate_samples(samples, builder.special.pad, [image, image])
    objective = GenerationObjective(bundle.model)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        out = objective(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(round(out.loss.item(), 6))
    return losses


def test_debug_losses_are_pinned():
    losses = run_debug_steps()
    if os.environ.get("UPDATE_PINNED_LOSSES") == "1":
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        ASSET.write_text(json.dumps({"seed": 0, "steps": STEPS, "losses": losses}, indent=2) + "\n")
    pinned = json.loads(ASSET.read_text())["losses"]
    assert len(pinned) == STEPS
    for step, (got, want) in enumerate(zip(losses, pinned)):
        assert abs(got - want) <= 1e-3 * abs(want), f"step {step}: loss {got} differs from pinned {want}"
    assert losses[-1] < losses[0]
