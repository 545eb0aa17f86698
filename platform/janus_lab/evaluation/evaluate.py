"""Evaluation of one checkpoint: what `jobs/evaluate.py` runs.

- held-out token NLL and accuracy per task on an ingested dataset's val split (`data_uri`);
- CLIP-T / CLIP-I of generations on a held-out prompt set (`prompts`, `clip_model`);
- images for GenEval, DPG-Bench and ImgEdit basic prompt files, in their official layouts.

Each part runs when its input is given. Scores go to `<output_dir>/scores.json` (and stdout);
benchmark images to `<output_dir>/geneval/`, `dpg_bench/` and `imgedit/`. A held-out row or prompt
the model cannot take (over `max_text_tokens`, an unreadable input image) is refused alone and
listed with its reason under `refused` in scores.json; the rest is evaluated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from janus_lab.config import load_config
from janus_lab.settings import ModelSource, SamplingSettings


@dataclasses.dataclass
class EvaluateConfig(ModelSource):
    """One evaluation of a checkpoint (`ModelSource`: model, device, dtype, compile); every part
    is optional, at least one is needed."""

    data_uri: str | None = None
    """Ingested dataset (local or `s3://`) whose val split gives held-out NLL and accuracy."""
    prompts: str | None = None
    """Held-out prompt set (JSONL of T2I and edit requests) for CLIP-T / CLIP-I."""
    clip_model: str | None = None
    """CLIP folder for the scores (local or `s3://`); `debug` = a tiny random test CLIP."""
    geneval: str | None = None
    """GenEval `evaluation_metadata.jsonl`: export images in GenEval's layout."""
    dpg: str | None = None
    """DPG-Bench prompt folder (`<id>.txt` files): export 2 x 2 grids."""
    imgedit: str | None = None
    """ImgEdit `basic_edit.json`: export one edit per key."""
    imgedit_images: str | None = None
    """Root folder of ImgEdit's input images (the `id` paths of basic_edit.json are under it)."""
    output_dir: str = "outputs/evaluate"
    """Where scores.json and the benchmark folders go."""
    settings: str | None = None
    """YAML of sampling fields (a CFG sweep's best_settings.yaml); None: the request defaults."""
    parallel_size: int = 4
    """Images per held-out prompt for the CLIP scores."""
    geneval_images: int = 4
    """Samples per GenEval prompt (GenEval's default is 4)."""
    seed: int = 0
    """Prompt i is generated with seed + i."""
    batch_images: int = 16
    """Images per engine batch."""
    batch_size: int = 4
    """Samples per forward pass of the held-out NLL."""
    max_text_tokens: int = 256
    """Longest prompt in tokens; a longer held-out row or prompt is refused alone, with its reason."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not any((self.data_uri, self.prompts, self.geneval, self.dpg, self.imgedit)):
            raise ValueError("nothing to evaluate: give data_uri, prompts, geneval, dpg or imgedit")
        if self.prompts and not self.clip_model:
            raise ValueError("prompts are scored with CLIP: set clip_model (a CLIP folder, or debug for a random test CLIP)")
        if bool(self.imgedit) != bool(self.imgedit_images):
            raise ValueError("imgedit and imgedit_images go together (basic_edit.json and its image root)")
        for name in ("parallel_size", "geneval_images", "batch_images", "batch_size", "max_text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class EvaluateSummary:
    """What an evaluation produced."""

    scores: dict
    """Held-out and CLIP metrics."""
    exports: dict[str, Path]
    """Benchmark -> its image folder."""
    clip_label: str | None
    scores_file: Path
    refused: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    """Part (`heldout`, `prompts`, a benchmark) -> row id, request index or item key -> reason."""


def sampling_settings(path: str | None) -> dict:
    """The settings file's sampling fields (all of them, defaults filled in); read as the server reads it."""
    return (load_config(SamplingSettings, path) if path else SamplingSettings()).sampling_dict()


def run_evaluate(cfg: EvaluateConfig) -> EvaluateSummary:
    """Runs every part the config asks for, checking all inputs before the model loads.

    Raises:
        BenchmarkFileError, FileNotFoundError, ModelSourceError, GenerationRequestError,
        ConfigError: a missing or malformed input, before any generation.
    """
    from janus_lab.evaluation.benchmarks import export_dpg, export_geneval, export_imgedit, read_dpg, read_geneval, \
        read_imgedit
    from janus_lab.evaluation.clip import ClipScorer, check_clip_source
    from janus_lab.evaluation.generation_scores import score_generation, with_settings
    from janus_lab.evaluation.heldout import heldout_metrics
    from janus_lab.generation import GenerationEngine, GenerationLimits
    from janus_lab.generation.loading import load_generation_model
    from janus_lab.generation.offline import read_request_file, resolve_device_and_dtype

    settings = sampling_settings(cfg.settings)
    requests = read_request_file(cfg.prompts, first_seed=cfg.seed) if cfg.prompts else []
    if cfg.clip_model:
        check_clip_source(cfg.clip_model)
    geneval = read_geneval(cfg.geneval) if cfg.geneval else []
    dpg = read_dpg(cfg.dpg) if cfg.dpg else []
    imgedit = read_imgedit(cfg.imgedit, cfg.imgedit_images) if cfg.imgedit else []

    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    bundle = load_generation_model(cfg.model, device=device, dtype=dtype)
    limits = GenerationLimits(max_text_tokens=cfg.max_text_tokens,
                              max_parallel_size=max(cfg.parallel_size, cfg.geneval_images, 4),
                              max_batch_images=max(cfg.batch_images, cfg.parallel_size, cfg.geneval_images, 4))
    engine = GenerationEngine.from_bundle(bundle, limits=limits, static_cache=cfg.compile or None,
                                          compile_step=cfg.compile)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores, exports, clip_label, refused = {}, {}, None, {}
    if cfg.data_uri:
        metrics, refused["heldout"] = heldout_metrics(bundle, cfg.data_uri, cfg.batch_size, cfg.max_text_tokens)
        scores.update(metrics)
    if requests:
        scorer = ClipScorer.load(cfg.clip_model, device)
        clip_label = scorer.label
        scored = score_generation(engine, with_settings(requests, settings, cfg.parallel_size), scorer,
                                  batch_images=limits.max_batch_images)
        scores.update(scored.metrics)
        refused["prompts"] = {str(index): reason for index, reason in scored.refused.items()}
    batch = limits.max_batch_images
    done = []
    if geneval:
        done.append(("geneval", export_geneval(engine, geneval, out / "geneval", settings, cfg.geneval_images,
                                                cfg.seed, batch)))
    if dpg:
        done.append(("dpg_bench", export_dpg(engine, dpg, out / "dpg_bench", settings, cfg.seed, batch)))
    if imgedit:
        done.append(("imgedit", export_imgedit(engine, imgedit, out / "imgedit", settings, cfg.seed, batch)))
    for name, export in done:
        exports[name], refused[name] = export.folder, export.refused
    refused = {part: items for part, items in refused.items() if items}
    scores_file = out / "scores.json"
    scores_file.write_text(json.dumps({"model": cfg.model, "settings": settings, "scores": scores,
                                       "clip": clip_label, "exports": {k: str(v) for k, v in exports.items()},
                                       "refused": refused}, indent=2) + "\n")
    return EvaluateSummary(scores=scores, exports=exports, clip_label=clip_label, scores_file=scores_file,
                           refused=refused)
