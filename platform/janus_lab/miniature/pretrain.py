"""Pre-training the miniature base model: text-to-image only, on the world, in one process.

This plays the part of Janus-Pro's own pre-training, which the platform takes as given: the
result is the `mini` base that fine-tuning starts from. It uses the platform's sequence layout
and loss (`SequenceBuilder`, `GenerationObjective`), with the 10% prompt drop that teaches the
unconditional branch CFG needs, but no Ray, no S3 and no tracking server: it is a one-off that
writes the shipped weights.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch

from janus_lab.miniature.vq_train import scenes_to_tensor
from janus_lab.miniature.world import WorldRecord, training_records
from janus_lab.model.objective import GenerationObjective
from janus_lab.model.sequence import MaskDecision, SequenceBuilder, collate_samples
from janus_lab.model.vq import encode_vq_codes

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Settings of the base model's pre-training; the shipped base records the ones that made it."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    text_drop: float = 0.1
    """Share of samples whose prompt becomes `<pad>` (the unconditional branch)."""
    num_records: int = 20000
    """Text-to-image records drawn from the world (held-out scenes excluded)."""
    data_seed: int = 0
    seed: int = 0
    log_every: int = 100
    device: str = "auto"
    """`cpu`, `cuda`, or `auto` (cuda when there is one)."""


def encode_records(vq, records: list[WorldRecord], batch: int = 64) -> list[list[int]]:
    """The VQ codes of each record's output image, with the platform's normalised search.

    The world repeats scenes (a canonical scene appears under many records), so each distinct
    scene is encoded once.
    """
    scenes = list(dict.fromkeys(r.output for r in records))
    codes: dict = {}
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        pixels = scenes_to_tensor([scene.render() for scene in chunk])
        codes.update(zip(chunk, encode_vq_codes(vq, pixels).tolist()))
    return [codes[r.output] for r in records]


def pretrain(model, processor, cfg: PretrainConfig) -> list[dict]:
    """Trains `model`'s generation path in place on the world's text-to-image records."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    model.to(device)
    records = training_records(cfg.data_seed, cfg.num_records, 0)
    started = time.monotonic()
    codes = encode_records(model.model.vqmodel, records)
    log.info("encoded %d records (%d distinct scenes) in %.0f s", len(records), len({r.output for r in records}),
             time.monotonic() - started)
    builder = SequenceBuilder(processor.tokenizer, len(codes[0]))
    objective = GenerationObjective(model)
    # Text-to-image only: the understanding encoder and its aligner see no input here.
    model.model.vision_model.requires_grad_(False)
    model.model.aligner.requires_grad_(False)
    model.train()
    model.model.vqmodel.eval()
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history = []
    window: list[tuple[float, float]] = []
    for step in range(1, cfg.steps + 1):
        picks = [rng.randrange(len(records)) for _ in range(cfg.batch_size)]
        samples = [builder.training_sample(records[i].prompt, codes[i],
                                           mask=MaskDecision(drop_text=rng.random() < cfg.text_drop))
                   for i in picks]
        batch = {k: v.to(device) for k, v in collate_samples(samples, builder.special.pad, []).items()}
        out = objective(**batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        window.append((out.loss.item(), out.accuracy.item()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss, accuracy = (sum(v) / len(window) for v in zip(*window))
            window.clear()
            entry = {"step": step, "loss": round(loss, 4), "accuracy": round(accuracy, 4),
                     "seconds": round(time.monotonic() - started, 1)}
            history.append(entry)
            log.info("step %(step)d loss %(loss).4f code accuracy %(accuracy).3f (%(seconds).0f s)", entry)
    model.eval().to("cpu")
    return history
