"""Scoring a model on the miniature world's held-out records with the exact scorer.

`evaluate_world` generates every held-out record (text-to-image prompts and edits with their
input images) through the platform's batched CFG engine, reads each image with
`janus_lab.miniature.score`, and returns the scores with chance and copy-the-input baselines
beside them, plus a picture grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from janus_lab.generation import GenerationEngine, GenerationRequest
from janus_lab.miniature.score import SampleScore, chance_scores, copy_input_scores, score_sample, summarise
from janus_lab.miniature.world import SIDE, WorldRecord, evaluation_records
from janus_lab.settings import SamplingSettings

log = logging.getLogger(__name__)


@dataclass
class WorldEvaluation:
    """Scores of one model on the held-out records."""

    summary: dict[str, float]
    chance: dict[str, float]
    copy_input: dict[str, float]
    samples: list[SampleScore]
    images: list[Image.Image] = field(default_factory=list)
    """One generated image per sample, in sample order."""


def requests_for(records: list[WorldRecord], samples: int, seed: int, sampling: dict) -> list[GenerationRequest]:
    """One engine request per record: `samples` images, the record's input images, fixed seeds."""
    return [GenerationRequest(prompt=r.prompt, input_images=r.input_images(), parallel_size=samples,
                              seed=seed + 1000 * i, **sampling) for i, r in enumerate(records)]


def evaluate_world(engine: GenerationEngine, records: list[WorldRecord] | None = None, samples: int = 2,
                   seed: int = 0, max_images: int = 64, **sampling) -> WorldEvaluation:
    """Generates and scores the held-out records (default: `evaluation_records()`).

    Args:
        engine: the model's generation engine.
        samples: images per record.
        seed: seed of the first record's images (record i uses seed + 1000 i).
        max_images: images per engine batch.
        sampling: `cfg_weight`, `cfg_weight2`, `temperature`, `top_k`, `top_p`.
    """
    records = evaluation_records() if records is None else records
    requests = requests_for(records, samples, seed, sampling)
    scores, images = [], []
    for index, result in engine.generate_in_batches(requests, max_images=max_images):
        for image in result.images:
            scores.append(score_sample(records[index], image))
            images.append(image)
    return WorldEvaluation(summarise(scores), chance_scores(records), copy_input_scores(records), scores, images)


def use_shipped_decoder(bundle, label: str) -> None:
    """Puts the shipped mini tokenizer's decoder (codes -> pixels) into `bundle`'s VQ tokenizer.

    Raises:
        ValueError: the model's codes come from another tokenizer (its code fingerprint differs
            from the shipped one's), so the shipped decoder would draw the wrong patches.
    """
    from janus_lab.data.ingest import vq_fingerprint
    from janus_lab.miniature.assets import load_mini_vq

    shipped = load_mini_vq()
    tokenizer = bundle.processor.tokenizer
    if vq_fingerprint(bundle.model, tokenizer) != vq_fingerprint(shipped, tokenizer):
        raise ValueError(f"{label}: its VQ codes come from another tokenizer than the shipped mini one; "
                         "decoder=mini only redraws codes of the same tokenizer")
    vq = bundle.model.model.vqmodel
    for name in ("post_quant_conv", "decoder"):
        getattr(vq, name).load_state_dict(getattr(shipped, name).state_dict())


def vq_ceiling(vq, records: list[WorldRecord]) -> dict[str, float]:
    """What the targets themselves score after the VQ round trip (encode, decode): the most any
    model that draws through this tokenizer can score."""
    from janus_lab.miniature.vq_train import round_trip, scenes_to_tensor
    from janus_lab.model.vq import tensor_to_images

    images = []
    for start in range(0, len(records), 64):
        pixels = scenes_to_tensor([r.output_image() for r in records[start:start + 64]])
        images += tensor_to_images(round_trip(vq, pixels).permute(0, 2, 3, 1))
    return summarise([score_sample(r, image) for r, image in zip(records, images)])


def decoder_ceiling(vq, records: list[WorldRecord]) -> dict[str, float]:
    """What the targets score decoded from their *right* codes (each exact 16 px patch's code in
    a `per_patch` tokenizer): the decoder's limit alone, with no encoder error."""
    import torch
    import torch.nn.functional as F

    from janus_lab.miniature.vq_train import PatchVocabulary, scenes_to_tensor
    from janus_lab.model.vq import tensor_to_images

    vocabulary = PatchVocabulary.of_world(vq.quantize.num_embeddings)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    images = []
    for start in range(0, len(records), 64):
        ids = vocabulary.ids(scenes_to_tensor([r.output_image() for r in records[start:start + 64]]))
        side = int(ids.shape[1] ** 0.5)
        with torch.no_grad():
            latent = codebook[ids].view(len(ids), side, side, -1).permute(0, 3, 1, 2)
            images += tensor_to_images(vq.decoder(vq.post_quant_conv(latent)).permute(0, 2, 3, 1))
    return summarise([score_sample(r, image) for r, image in zip(records, images)])


def comparison_grid(records: list[WorldRecord], columns: dict[str, list[Image.Image]], scale: int = 2) -> Image.Image:
    """A picture: one row per record with its inputs, the target and each model's image.

    Args:
        records: the rows.
        columns: column title -> one image per record (e.g. "base", "fine-tuned").
    """
    side = SIDE * scale
    max_inputs = max((len(r.inputs) for r in records), default=0)
    titles = [f"input {k + 1}" for k in range(max_inputs)] + ["target"] + list(columns)
    text_width = 330
    header = 18
    grid = Image.new("RGB", (text_width + side * len(titles), header + side * len(records)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((text_width + c * side + 4, 3), title, fill=(0, 0, 0))
    for row, record in enumerate(records):
        y = header + row * side
        draw.text((4, y + side // 2 - 6), record.prompt[:56], fill=(0, 0, 0))
        cells = [*record.input_images(), *[None] * (max_inputs - len(record.inputs)), record.output_image()]
        cells += [images[row] for images in columns.values()]
        for c, image in enumerate(cells):
            if image is not None:
                grid.paste(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST),
                           (text_width + c * side, y))
    return grid


@dataclass
class EvaluateWorldConfig(SamplingSettings):
    """`jobs/evaluate_world.py`: held-out scores of one or more models on the miniature world,
    every model sampled with the same `SamplingSettings`."""

    models: list[str] = field(default_factory=lambda: ["mini"])
    """Models to score side by side: `mini`, a checkpoint folder, `s3://` prefix or `models:/name@alias`."""
    labels: list[str] = field(default_factory=list)
    """Column names for the models (default: the model strings)."""
    output_dir: str = "outputs/world-eval"
    """Where scores.json, scores.md and grid.png go."""
    samples: int = 2
    """Images per held-out record."""
    seed: int = 0
    """Seed of the first record's images."""
    grid_rows: int = 3
    """Records per kind (text-to-image and each edit) shown in grid.png."""
    decoder: str | None = None
    """`mini`: draw every model's codes with the shipped tokenizer's decoder (a model trained
    before the decoder was retrained keeps its codes; its pictures come out as today's)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.models:
            raise ValueError("models must name at least one model")
        if self.labels and len(self.labels) != len(self.models):
            raise ValueError(f"labels names {len(self.labels)} columns for {len(self.models)} models")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


SCORE_ROWS = (("t2i", "text-to-image (prompt followed)"), ("edit", "edit (instruction followed and rest kept)"),
              ("following", "edit: instruction followed"), ("preservation", "edit: rest of the image kept"),
              ("compose", "two-input composition"))


def scores_table(columns: dict[str, dict[str, float]], chance: dict[str, float], copy: dict[str, float],
                 samples: dict[str, int], ceiling: dict[str, float]) -> str:
    """A Markdown table: one row per score, one column per model; beside them chance (a random
    scene of the world), copying the input, and the target through the VQ (the ceiling)."""
    names = list(columns)
    lines = ["| score | " + " | ".join(names) + " | chance | copy input | target via VQ |",
             "|---|" + "---|" * (len(names) + 3)]
    for key, title in SCORE_ROWS + tuple((k, k) for k in sorted(chance) if k.startswith("edit.")):
        cells = [f"{columns[n].get(key, float('nan')):.3f}" for n in names]
        lines.append(f"| {title} (n={samples.get(key, 0)}) | " + " | ".join(cells)
                     + f" | {chance.get(key, float('nan')):.3f} | {copy.get(key, float('nan')):.3f}"
                     f" | {ceiling.get(key, float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def run_evaluate_world(cfg: EvaluateWorldConfig) -> dict:
    """Scores every model of `cfg` on the held-out records; writes scores.json/.md and grid.png."""
    import json
    from pathlib import Path

    from janus_lab.generation.loading import load_generation_model

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = evaluation_records()
    labels = cfg.labels or cfg.models
    results: dict[str, WorldEvaluation] = {}
    ceiling: dict[str, float] = {}
    for label, uri in zip(labels, cfg.models):
        bundle = load_generation_model(uri)
        if cfg.decoder == "mini":
            use_shipped_decoder(bundle, uri)
        ceiling = ceiling or vq_ceiling(bundle.model.model.vqmodel, records)
        engine = GenerationEngine.from_bundle(bundle)
        results[label] = evaluate_world(engine, records, samples=cfg.samples, seed=cfg.seed, **cfg.sampling_dict())
        log.info("%s: %s", label, json.dumps({k: round(v, 3) for k, v in results[label].summary.items()}))
    first = next(iter(results.values()))
    samples = {key: _count(first.samples, key) for key in first.summary}
    table = scores_table({k: v.summary for k, v in results.items()}, first.chance, first.copy_input, samples, ceiling)
    (out / "scores.md").write_text(table)
    (out / "scores.json").write_text(json.dumps(
        {"models": dict(zip(labels, cfg.models)),
         "settings": {"samples": cfg.samples, **cfg.sampling_dict(), "seed": cfg.seed},
         "scores": {k: v.summary for k, v in results.items()}, "chance": first.chance,
         "copy_input": first.copy_input, "target_via_vq": ceiling, "samples": samples}, indent=2) + "\n")
    shown = _grid_rows(records, cfg.grid_rows)
    columns = {label: [result.images[i * cfg.samples] for i in shown] for label, result in results.items()}
    comparison_grid([records[i] for i in shown], columns).save(out / "grid.png")
    return {"table": table, "folder": str(out)}


def _count(samples: list[SampleScore], key: str) -> int:
    if key == "t2i":
        return sum(s.record.task == "t2i" for s in samples)
    if key in ("edit", "following", "preservation"):
        return sum(s.record.task == "ti2i" for s in samples)
    kind = "compose" if key == "compose" else key.removeprefix("edit.")
    return sum(s.record.edit == kind for s in samples)


def _grid_rows(records: list[WorldRecord], per_kind: int) -> list[int]:
    seen: dict[str | None, int] = {}
    rows = []
    for i, record in enumerate(records):
        if seen.get(record.edit, 0) < per_kind:
            seen[record.edit] = seen.get(record.edit, 0) + 1
            rows.append(i)
    return rows
