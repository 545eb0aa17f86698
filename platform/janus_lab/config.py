"""Typed experiment config: dataclasses, one YAML per experiment, dotted command-line overrides.

Every job's `main()` starts with

    cfg = parse_cli(ExperimentConfig, sys.argv[1:], description=__doc__)

which reads `--config jobs/configs/<name>.yaml`, applies `KEY=VALUE` overrides such as
`train.lr=1e-5` or `model.preset=janus-pro-7b`, checks every key and type, and runs each
section's `__post_init__` checks. A misspelt key is an error with a suggestion, never a silent
default; `--help` lists every key with its type, default and docstring.

Conventions for config classes:

- a section is a field typed as another config dataclass, with `default_factory`;
- every field is followed by a one-line string literal, its docstring (read by `describe`);
- a `__post_init__` check raises ValueError with a message that starts with the field it is
  about ("lr must be > 0, got -1"); the loader prefixes the section ("train.lr must be ...").
"""

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from janus_lab.settings import SamplingSettings

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its config class."""


# --------------------------------------------------------------------------- experiment config


def _check(cfg: Any, names: Sequence[str], ok: Callable[[Any], bool], requirement: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not ok(value):  # None is an Optional field left unset
            raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _check_positive(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: v > 0, "> 0")


def _check_non_negative(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: v >= 0, ">= 0")


def _check_fraction(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: 0 <= v <= 1, "in [0, 1]")


def _check_not_empty(cfg: Any, *names: str) -> None:
    _check(cfg, names, lambda v: bool(v), "a non-empty string")


@dataclasses.dataclass
class S3RetryConfig:
    """How long a job waits out an S3 outage before it fails (`janus_lab.retry`, docs/reliability.md)."""

    attempts: int = 8
    """Tries of one storage step (a shard write, a window read, a checkpoint upload) while S3 does
    not answer; 1 = no retry. The defaults wait 1+2+4+8+16+30+30 s, about 1.5 min, in all."""
    first_delay_s: float = 1.0
    """Wait before the first retry; each later wait doubles."""
    max_delay_s: float = 30.0
    """Longest single wait."""

    def __post_init__(self) -> None:
        _check_positive(self, "attempts")
        _check_non_negative(self, "first_delay_s", "max_delay_s")


@dataclasses.dataclass
class ModelConfig:
    """Which Janus-Pro network to build, from which weights, at which precision."""

    preset: Literal["debug", "mini", "mini-init", "janus-pro-1b", "janus-pro-7b"] = "debug"
    """Architecture: `debug` (2 layers, hidden 64, random init), `mini` (the trained miniature
    shipped in the repo: 4 layers, hidden 192, 64 px; `mini-init` = its VQ with a random language
    model) or the released 1B/7B shapes."""
    weights: str | None = None
    """HF-format checkpoint folder, `s3://` prefix (safetensors) or registered version
    (`models:/janus-4o@champion`, pinned to its version number when the run starts); None = random init."""
    image_size: int = 64
    """Image side in pixels: 64 or 384 for `debug` (16 or 576 image tokens), 384 otherwise."""
    freeze_vision: bool = False
    """Freeze the SigLIP understanding encoder (the VQ tokenizer is always frozen)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: float32 (CPU tests) or bfloat16 (FSDP2 mixed precision on GPUs)."""

    def __post_init__(self) -> None:
        if self.preset == "debug":
            if self.image_size not in (64, 384):
                raise ValueError(f"image_size must be 64 or 384 for the debug preset, "
                                 f"got {self.image_size}")
        elif self.preset.startswith("mini"):
            if self.image_size != 64:
                raise ValueError(f"image_size must be 64 for preset {self.preset!r}, got {self.image_size}")
        elif self.image_size != 384:
            # The released SigLIP encoder and 24x24 VQ grid only exist at 384 px.
            raise ValueError(f"image_size must be 384 for preset {self.preset!r}, "
                             f"got {self.image_size}")


@dataclasses.dataclass
class MaskingConfig:
    """Condition dropping during training, which teaches the branches CFG needs (docs/design.md, "Masking")."""

    t2i_text_drop: float = 0.1
    """Chance a T2I sample's prompt becomes `<pad>` (the unconditional branch; paper 0.10)."""
    ti2i_image_drop: float = 0.5
    """Chance a TI2I input image's VQ slot stays `<pad>` (the partial branch; paper 0.50)."""
    seed: int = 0
    """Seed of the per-sample, per-epoch drop draws, so a resumed run draws the same."""

    def __post_init__(self) -> None:
        _check_fraction(self, "t2i_text_drop", "ti2i_image_drop")


@dataclasses.dataclass
class DataConfig:
    """Where the ingested training shards are and how samples are read from them."""

    uri: str = "data/sample-shards"
    """Local folder or `s3://` prefix of the ingested Parquet shards and `_manifest.json`."""
    max_text_tokens: int = 256
    """Longest prompt in tokens; at least the dataset's ingest limit (checked before training starts)."""
    shuffle_seed: int = 0
    """Seed of each epoch's order: which row groups each worker reads, and the row order in a window."""
    shuffle_window_rows: int = 1024
    """Rows (whole row groups) a worker reads and shuffles together: more mixes each step more
    evenly, at the cost of host memory (a worker holds two windows, one prefetched)."""

    def __post_init__(self) -> None:
        _check_not_empty(self, "uri")
        _check_positive(self, "max_text_tokens", "shuffle_window_rows")


@dataclasses.dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, through `peft`) instead of full fine-tuning (docs/design.md, "Adapters").

    The base stays frozen (bfloat16 on GPUs); only the adapters train, so the optimizer state,
    gradients and checkpoints hold the adapters alone.
    """

    rank: int = 0
    """Adapter rank r; 0 = off (full fine-tuning). A sweep's grid can range over it, 0 included."""
    alpha: float | None = None
    """Scale numerator: an adapter's update is multiplied by alpha / rank; None = 2 x rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers of the language model's decoder layers that get an adapter (attention and MLP)."""
    generation_head: bool = False
    """Also adapt the image generation head's two projections."""
    aligner: bool = False
    """Also adapt the generation aligner (image-code embeddings into the language model)."""
    lr: float | None = None
    """Peak learning rate of the adapters; None = train.lr. Adapters start at zero and usually
    want 10-100 times a full fine-tune's rate."""
    merge: bool = False
    """Export the base with the adapters merged in (a full model) instead of the adapter alone."""

    def __post_init__(self) -> None:
        _check_non_negative(self, "rank")
        _check_positive(self, "alpha", "lr")
        _check(self, ["dropout"], lambda v: 0 <= v < 1, "in [0, 1)")
        if self.rank and not self.target_modules:
            raise ValueError("target_modules must name at least one layer when rank > 0")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclasses.dataclass
class TrainConfig:
    """Optimizer, schedule, batch geometry, Ray Train workers and checkpointing (docs/design.md, "Training")."""

    lr: float = 5e-6
    """Peak AdamW learning rate (paper: 5e-6)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    weight_decay_exempt: Literal["biases_and_norms", "biases"] = "biases_and_norms"
    """Parameters not decayed: biases and norm weights, or biases only. The published script means
    to exempt both, but its name filter ("bias", "LayerNorm.weight") matches no Janus norm, so its
    run decayed norm weights (`biases` reproduces that). Ours exempts them: a norm weight is a
    per-channel gain, and decaying it shrinks the layer's output instead of regularising it."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2). The published script keeps torch's (0.9, 0.999), whose second moment
    remembers ~1000 steps, more than the whole 5% warmup of a few-thousand-step fine-tune; 0.95
    (~20 steps, as LLM training has used since GPT-3) keeps it current, so a jump in gradient
    size does not make an outsized step."""
    warmup_ratio: float = 0.05
    """Fraction of all optimizer steps spent in linear warmup."""
    min_lr_ratio: float = 0.15
    """Floor of the cosine decay, as a fraction of the peak lr."""
    grad_clip: float = 1.0
    """Largest global gradient norm; larger gradients are scaled down to it."""
    epochs: int = 3
    """Passes over the training shards."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, even mid-epoch; None = train all epochs."""
    global_batch_size: int = 128
    """Samples per optimizer step, summed over workers and accumulation steps (paper: 128)."""
    micro_batch_size: int = 1
    """Samples per forward/backward pass on one worker."""
    num_workers: int = 8
    """Ray Train workers, one GPU each when use_gpu is true."""
    use_gpu: bool = True
    """Give each worker a GPU; false trains on CPU (tests, debug runs)."""
    activation_checkpointing: bool = False
    """Recompute decoder-layer activations in backward: less memory, about 1/3 more compute."""
    reduce_every_micro_batch: bool = False
    """Reduce-scatter gradients after every micro-batch instead of once per optimizer step:
    only sharded gradients are kept (no unsharded fp32 buffer across the accumulation window,
    27.7 GB per GPU for 7B) for accumulation-times the reduce-scatter traffic."""
    report_every: int = 10
    """Optimizer steps between metric reports (`ray.train.report`)."""
    checkpoint_every: int = 500
    """Optimizer steps between sharded checkpoints."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept in storage; older ones are deleted."""
    seed: int = 42
    """Seed of model init and the torch RNGs."""
    storage_path: str = "outputs"
    """Local folder or `s3://` prefix where Ray Train writes checkpoints and results."""
    eval_every: int = 0
    """Optimizer steps between validations (held-out NLL/accuracy per task); 0 = at the end only."""
    world_eval_samples: int = 0
    """Miniature world only: images per held-out record generated and read by the world's exact
    scorer at each validation, logged as `world_t2i`, `world_edit`, ..., `world_mean`; 0 = off."""
    world_eval_cfg_weight: float = 5.0
    """Guidance weight of those generations (`cfg_weight` and `cfg_weight2`)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train allows; each resumes from the latest checkpoint."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """Low-rank adapters instead of full fine-tuning (`train.lora.rank=16`)."""

    def __post_init__(self) -> None:
        _check_positive(self, "lr", "grad_clip", "epochs", "max_steps", "global_batch_size",
                        "micro_batch_size", "num_workers", "report_every", "checkpoint_every",
                        "keep_checkpoints", "world_eval_cfg_weight")
        _check_non_negative(self, "weight_decay", "eval_every", "max_failures", "world_eval_samples")
        _check_fraction(self, "warmup_ratio", "min_lr_ratio")
        _check(self, ["betas"], lambda b: all(0 <= beta < 1 for beta in b), "two numbers in [0, 1)")
        _check_not_empty(self, "storage_path")
        per_pass = self.num_workers * self.micro_batch_size
        if self.global_batch_size % per_pass:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by num_workers "
                f"({self.num_workers}) x micro_batch_size ({self.micro_batch_size}) = {per_pass}; "
                f"pick a multiple of {per_pass}")

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches each worker accumulates before one optimizer step."""
        return self.global_batch_size // (self.num_workers * self.micro_batch_size)


@dataclasses.dataclass
class TrackingConfig:
    """Where the run is recorded in MLflow."""

    experiment: str = "janus-4o"
    """MLflow experiment name."""
    tracking_uri: str | None = None
    """MLflow tracking server URI; None = MLFLOW_TRACKING_URI from the environment."""
    run_name: str | None = None
    """MLflow run name; None = the experiment config's `name`."""

    def __post_init__(self) -> None:
        _check_not_empty(self, "experiment")


@dataclasses.dataclass
class ExperimentConfig:
    """One fine-tuning experiment: what `jobs/finetune.py --config X.yaml` runs."""

    name: str = "debug"
    """Short name of the experiment; names the Ray Train run and, by default, the MLflow run."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Which network, weights and precision."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Training shards."""
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    """Condition dropping for classifier-free guidance."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Optimizer, schedule, batch geometry, workers and checkpoints."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    """MLflow experiment and run."""
    retry: S3RetryConfig = dataclasses.field(default_factory=S3RetryConfig)
    """How long reading shards and uploading checkpoints wait out an S3 outage."""

    def __post_init__(self) -> None:
        _check_not_empty(self, "name")


@dataclasses.dataclass
class IngestSourceConfig:
    """The raw dataset an ingest reads."""

    format: Literal["sharegpt4o", "echo4o", "jsonl"] = "sharegpt4o"
    """Layout: ShareGPT-4o-Image (JSON + `*_part_N.tar`), Echo-4o-Image (JSONL + `.tar.gz`), or plain JSONL."""
    path: str = "data/sample"
    """Folder of the raw dataset, local or `s3://`; image paths in records are relative to it."""

    def __post_init__(self) -> None:
        _check_not_empty(self, "path")


@dataclasses.dataclass
class IngestOutputConfig:
    """Where the Parquet shards, `_rejects.parquet` and `_manifest.json` go."""

    uri: str = "data/sample-shards"
    """Local folder or `s3://` prefix of the ingested dataset."""
    overwrite: bool = False
    """Replace a finished dataset already at `uri`; false refuses to touch it."""
    rows_per_shard: int = 2048
    """Target rows per Parquet shard (a shard is what one writer task writes)."""
    rows_per_row_group: int = 128
    """Most rows per Parquet row group, the unit a training worker reads: small groups let each
    worker fetch only its own part of an epoch and mix rows from many places of the dataset."""

    def __post_init__(self) -> None:
        _check_not_empty(self, "uri")
        _check_positive(self, "rows_per_shard", "rows_per_row_group")


@dataclasses.dataclass
class IngestLimitsConfig:
    """Bounds on what a record may contain; a record outside them is rejected with a reason."""

    max_image_pixels: int = 4096 * 4096
    """Largest width x height an image header may claim; checked before any pixel is decoded."""
    max_text_tokens: int = 256
    """Longest prompt in tokens of the model's tokenizer; fine-tunes of the dataset need at least this."""

    def __post_init__(self) -> None:
        _check_positive(self, "max_image_pixels", "max_text_tokens")


DEFAULT_VAL_FRACTION = 0.1


@dataclasses.dataclass
class SplitConfig:
    """The train/validation split: by fraction or by count, a function of (seed, sample ids)."""

    val_fraction: float | None = None
    """Share of samples that go to `val` (0: no validation split); None = 0.1 unless val_count is set."""
    val_count: int | None = None
    """Instead of a fraction: this many samples go to `val`, those with the lowest split hash."""
    seed: int = 0
    """Seed of the split hash; the same seed gives the same split on every run."""

    def __post_init__(self) -> None:
        _check_fraction(self, "val_fraction")
        _check_non_negative(self, "val_count")
        if self.val_fraction is not None and self.val_count is not None:
            raise ValueError(f"val_fraction ({self.val_fraction}) and val_count ({self.val_count}) both hold out a "
                             "validation split: set one of them, the other to null")

    @property
    def fraction(self) -> float | None:
        """The share held out, or None when the split is by count."""
        if self.val_count is not None:
            return None
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction


@dataclasses.dataclass
class IngestRayConfig:
    """How the ingest spreads over the Ray cluster."""

    num_encoder_actors: int = 1
    """VQ-encoder actors, each holding the model once (one GPU each when the cluster has GPUs)."""
    batch_size: int = 32
    """Records per VQ-encoder call."""
    records_per_task: int = 64
    """Records per image-reading task (a `.tar.gz` part is always read by one task)."""

    def __post_init__(self) -> None:
        _check_positive(self, "num_encoder_actors", "batch_size", "records_per_task")


@dataclasses.dataclass
class IngestConfig:
    """One dataset ingest: what `jobs/ingest.py --config X.yaml` runs."""

    source: IngestSourceConfig = dataclasses.field(default_factory=IngestSourceConfig)
    """The raw dataset."""
    output: IngestOutputConfig = dataclasses.field(default_factory=IngestOutputConfig)
    """The ingested dataset."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The model whose VQ tokenizer encodes the images and whose image side they are letterboxed to."""
    init_seed: int = 42
    """Seed of the random init when `model.weights` is None; must equal the fine-tune's `train.seed`."""
    limits: IngestLimitsConfig = dataclasses.field(default_factory=IngestLimitsConfig)
    """Per-record bounds."""
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    """Train/validation split."""
    ray: IngestRayConfig = dataclasses.field(default_factory=IngestRayConfig)
    """Actors, batch sizes and task sizes."""
    retry: S3RetryConfig = dataclasses.field(default_factory=S3RetryConfig)
    """How long writing shards, the rejects and the manifest wait out an S3 outage."""


# --------------------------------------------------------------------------- sweeps


DEFAULT_MASKING_GRID = {"masking.t2i_text_drop": [0.0, 0.1, 0.25], "masking.ti2i_image_drop": [0.0, 0.25, 0.5, 0.75]}
DEFAULT_CFG_GRID = {"cfg_weight": [1.0, 3.0, 5.0, 7.0], "cfg_weight2": [1.0, 3.0, 5.0], "temperature": [0.8, 1.0]}
WORLD_SWEEP_METRICS = ("world_t2i", "world_edit", "world_following", "world_preservation", "world_compose",
                       "world_mean")
"""What a CFG sweep with `scorer: world` reports (`world_mean` averages text-to-image and edit)."""


def _check_grid(grid: Mapping[str, Any], check_key: Callable[[str], None]) -> None:
    """A grid names at least one key, each with a non-empty list of distinct scalar values."""
    if not grid:
        raise ValueError("grid is empty: name at least one key with a list of values, "
                         "e.g. masking.t2i_text_drop: [0.0, 0.1]")
    for key, values in grid.items():
        check_key(key)
        if not values:
            raise ValueError(f"grid.{key} has no values: give at least one")
        if any(isinstance(v, (list, dict)) for v in values):
            raise ValueError(f"grid.{key} must list single values, got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"grid.{key} lists a value twice: {values!r}")


@dataclasses.dataclass
class SweepRunConfig:
    """How a Ray Tune sweep runs its trials and where Tune keeps its state."""

    max_concurrent_trials: int = 1
    """Most trials at once; lowered to what the cluster can hold with every trial's resources."""
    trial_cpus: float = 1.0
    """CPUs reserved for each trial's own process (the Tune function that trains or generates)."""
    trial_gpus: float = 0.0
    """GPUs reserved for each trial's own process (a CFG sweep on GPUs: 1)."""
    storage_path: str = "outputs/sweeps"
    """Local folder or `s3://` prefix for Tune's experiment state; `--resume` continues from it."""
    max_failures: int = 2
    """Times Tune starts a failed trial again (its node lost, a worker killed); it resumes from its last checkpoint."""

    def __post_init__(self) -> None:
        _check_positive(self, "max_concurrent_trials", "trial_cpus")
        _check_non_negative(self, "trial_gpus", "max_failures")
        _check_not_empty(self, "storage_path")


@dataclasses.dataclass
class MaskingAblationConfig:
    """A masking-ratio ablation: `sweeps/masking_ablation.py --config X.yaml` (docs/design.md, "Masking", "Sweeps")."""

    name: str = "masking-ablation"
    """Sweep name: the Tune experiment, the MLflow parent run and the prefix of every trial's run."""
    experiment: str = "jobs/configs/debug.yaml"
    """Fine-tuning config (ExperimentConfig YAML) every trial starts from."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Edits of that config shared by every trial, as dotted keys: `train.max_steps: 100`."""
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MASKING_GRID))
    """Dotted experiment keys -> values; one trial per combination, each run to the end."""
    metric: str = "val_nll"
    """Metric of the results table's heatmap and of the best trial."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (min) or higher (max) `metric` is better."""
    table_metrics: list[str] = dataclasses.field(
        default_factory=lambda: ["val_t2i_nll", "val_ti2i_nll", "val_accuracy", "loss"])
    """Further final metrics shown in the results table."""
    data_cpus: float = 1.0
    """CPUs left free per running trial for its Ray Data reading, which runs outside the trial's reservation."""
    run: SweepRunConfig = dataclasses.field(default_factory=SweepRunConfig)
    """Concurrency, per-trial resources and Tune storage."""
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="janus-4o-sweeps"))
    """MLflow experiment of the parent and child runs (every trial logs there)."""

    def __post_init__(self) -> None:
        _check_not_empty(self, "name", "experiment", "metric")
        _check_non_negative(self, "data_cpus")
        for key in self.overrides:
            check_config_key(ExperimentConfig, key, "overrides", leaf_only=False)
        _check_grid(self.grid, lambda key: check_config_key(ExperimentConfig, key, "grid"))
        for key in self.grid:
            if key == "name":
                raise ValueError("grid must not set name: every trial is named after the sweep and its cell")
            if key in self.overrides:
                raise ValueError(f"grid and overrides both set {key}; keep it in one of them")


@dataclasses.dataclass
class CfgSweepConfig:
    """A CFG-weight sweep on one checkpoint: `sweeps/cfg_sweep.py --config X.yaml` (docs/design.md, "Sweeps")."""

    name: str = "cfg-sweep"
    """Sweep name: the Tune experiment and the MLflow parent run."""
    model: str = "models:/janus-4o@champion"
    """Checkpoint folder, `s3://` prefix, `models:/name@alias` (pinned to its version at start), or `debug`."""
    prompts: str = "sweeps/prompts/debug.jsonl"
    """Held-out prompt set: JSONL of requests, T2I and edit (`input_images` relative to the file)."""
    clip_model: str = "debug"
    """CLIP folder (Hugging Face layout, local or `s3://`) for CLIP-T / CLIP-I; `debug` = a tiny random CLIP."""
    scorer: Literal["clip", "world"] = "clip"
    """`clip` for real images; `world` for the miniature world: the exact scorer reads every image
    against the targets beside the prompt file (`targets.jsonl`, `jobs/sample_data.py --world
    mini --eval-requests`), and metrics are world_t2i, world_edit, world_following, world_preservation, world_compose."""
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CFG_GRID))
    """Sampling fields (cfg_weight, cfg_weight2, temperature, top_k, top_p) -> values; one trial each."""
    metric: str = "clip_t"
    """Score that picks the best setting: clip_t (prompt-image) or clip_i (edit input-output); with
    `scorer: world`, one of world_t2i, world_edit, world_following, world_preservation, world_compose, world_mean."""
    mode: Literal["min", "max"] = "max"
    """Whether lower (min) or higher (max) `metric` is better."""
    parallel_size: int = 2
    """Images generated per prompt in every trial."""
    seed: int = 0
    """Seed of prompt i is seed + i, in every trial: settings are compared on the same draws."""
    batch_images: int = 16
    """Images per engine batch."""
    best_settings: str | None = None
    """Where the best setting is written as YAML (the server's `defaults_file`); None:
    outputs/sweeps/<name>/best_settings.yaml."""
    run: SweepRunConfig = dataclasses.field(default_factory=SweepRunConfig)
    """Concurrency, per-trial resources and Tune storage."""
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="janus-4o-sweeps"))
    """MLflow experiment of the parent and child runs."""

    def __post_init__(self) -> None:
        _check_not_empty(self, "name", "model", "prompts", "clip_model")
        _check_positive(self, "parallel_size", "batch_images")
        _check_non_negative(self, "seed")
        metrics = WORLD_SWEEP_METRICS if self.scorer == "world" else ("clip_t", "clip_i")
        if self.metric not in metrics:
            raise ValueError(f"metric must be one of {', '.join(metrics)} with scorer {self.scorer}, "
                             f"got {self.metric!r}")
        _check_grid(self.grid, _check_sampling_key)

    @property
    def best_settings_path(self) -> str:
        """Where the best setting's YAML goes."""
        return self.best_settings or f"outputs/sweeps/{self.name}/best_settings.yaml"


def _check_sampling_key(key: str) -> None:
    keys = SamplingSettings.keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(keys)}"
        raise ConfigError(f"unknown key '{key}' in grid (a CFG sweep searches sampling settings); {hint}")


# Where shipped YAMLs live and the class each must load as. tests/test_config.py loads every
# YAML under these folders, so a new entry point with its own config folder registers it here.
# The first entry that contains a file wins, so a file or subfolder goes before its folder.
CONFIG_DIRS: dict[str, type] = {
    "jobs/configs/ingest_sample.yaml": IngestConfig,
    "jobs/configs/ingest_mini.yaml": IngestConfig,
    "jobs/configs": ExperimentConfig,
    "sweeps/configs/cfg_debug.yaml": CfgSweepConfig,
    "sweeps/configs/cfg_janus4o_7b.yaml": CfgSweepConfig,
    "sweeps/configs/cfg_mini.yaml": CfgSweepConfig,
    "sweeps/configs": MaskingAblationConfig,
}


# --------------------------------------------------------------------------- YAML


class _ConfigYamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 1e-5` would be the string
    "1e-5"; that is how everyone writes learning rates.
    """


_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigYamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None


def _read_config_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    data = _parse_yaml(text, str(path))
    if data is None:  # an empty file means all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {_typed_repr(data)}")
    return data


# --------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Builds a config from a YAML file and dotted overrides, checking every key and value.

    Args:
        cls: The config dataclass, e.g. `ExperimentConfig`.
        path: YAML file of the experiment; None starts from the class defaults.
        overrides: `KEY=VALUE` strings applied after the file, in order; VALUE is parsed as
            YAML (`1e-5`, `true`, `null`, `[1, 2]`) and replaces whatever is at KEY.

    Returns:
        An instance of `cls` whose sections are instances of their own config classes.

    Raises:
        ConfigError: An unknown key, a value of the wrong type, a failed `__post_init__`
            check or an unreadable file; the message names the dotted key and its source.
    """
    data = _read_config_file(Path(path)) if path is not None else {}
    builder = _Builder(cls, str(path) if path is not None else "the defaults")
    for text in overrides:
        builder.apply_override(data, text)
    try:
        return builder.build(cls, data)
    except _TypeMismatch as err:
        raise ConfigError(str(err)) from None  # the subclass is bookkeeping, not part of the API


def from_dict(cls: type[T], data: Mapping) -> T:
    """Builds a config from a plain nested dict (what `to_dict` returns), with the same checks
    as `load_config`; how a config travels to Ray workers."""
    try:
        return _Builder(cls, "a dict").build(cls, dict(data))
    except _TypeMismatch as err:
        raise ConfigError(str(err)) from None


def check_config_key(cls: type, key: str, where: str, *, leaf_only: bool = True) -> None:
    """Checks that a dotted key names a field of a config class (a sweep's grid or overrides).

    Raises:
        ConfigError: an unknown key (with a did-you-mean suggestion), a key below a scalar, or
            (with `leaf_only`) a section rather than a single value.
    """
    parts = key.split(".")
    _Builder(cls, where)._check_key_path(parts, where)
    if leaf_only and dataclasses.is_dataclass(_field_type(cls, parts)):
        raise ConfigError(f"'{key}' in {where} is a section of {cls.__name__}; name one of its keys, "
                          f"e.g. '{key}.{next(iter(_init_fields(_field_type(cls, parts))))}'")


def _field_type(cls: type, parts: list[str]) -> Any:
    for part in parts:
        cls = _type_hints(cls)[part]
    return cls


class _TypeMismatch(ConfigError):
    """The value at `key` itself has the wrong type (as opposed to something nested in it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Builder:
    """Builds one config tree from raw YAML data, remembering where each value came from."""

    def __init__(self, root: type, file_source: str):
        self.root = root
        self.file_source = file_source
        self.override_sources: dict[str, str] = {}  # dotted key -> "override 'KEY=VALUE'"

    def source_of(self, key: str) -> str:
        # An override of a section ("model={...}") is the source of every key inside it too.
        for end in range(len(key), 0, -1):
            if (end == len(key) or key[end] in ".[") and key[:end] in self.override_sources:
                return self.override_sources[key[:end]]
        return self.file_source

    def apply_override(self, data: dict, text: str) -> None:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad override '{text}': expected KEY=VALUE with a dotted key, "
                              f"e.g. train.lr=1e-5")
        source = f"override '{text}'"
        parts = key.split(".")
        mapping_depth = self._check_key_path(parts, source)
        if mapping_depth is not None:
            # `grid.masking.t2i_text_drop=[0, 0.5]`: the rest of the key is one key of the mapping.
            parts = parts[:mapping_depth + 1] + [".".join(parts[mapping_depth + 1:])]
        node = data
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise self._section_error(".".join(parts[:depth + 1]), node[part])
            node = node[part]
        node[parts[-1]] = _parse_yaml(value_text, source)
        self.override_sources[key] = source

    def _check_key_path(self, parts: list[str], source: str) -> int | None:
        """Checks a dotted key; returns the depth of a mapping field the rest of the key is a
        key of (`grid.masking.t2i_text_drop`), or None."""
        cls = self.root
        for depth, part in enumerate(parts):
            prefix = ".".join(parts[:depth])
            if part not in _init_fields(cls):
                raise self._unknown_key(cls, prefix, part, source)
            if depth < len(parts) - 1:
                tp = _type_hints(cls)[part]
                if get_origin(tp) is dict:
                    return depth
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"'{_join(prefix, part)}' is a {_type_name(tp)}, not a "
                                      f"section, so '{'.'.join(parts)}' does not exist "
                                      f"(in {source})")
                cls = tp

    def build(self, cls: type[T], data: Mapping, prefix: str = "") -> T:
        fields = _init_fields(cls)
        for name in data:
            if name not in fields:
                key = _join(prefix, str(name))
                raise self._unknown_key(cls, prefix, str(name), self.source_of(key))
        hints = _type_hints(cls)
        kwargs = {}
        for name, field in fields.items():
            key = _join(prefix, name)
            if name in data:
                kwargs[name] = self.coerce(data[name], hints[name], key)
            elif (field.default is dataclasses.MISSING
                  and field.default_factory is dataclasses.MISSING):
                raise ConfigError(f"missing required key '{key}' (in {self.source_of(key)})")
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise self._check_error(cls, prefix, err) from err

    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        """Checks `value` against the annotation `tp` and returns it in the field's type."""
        origin, args = get_origin(tp), get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if value is None:  # a section whose keys are all commented out
                value = {}
            if not isinstance(value, Mapping):
                raise self._section_error(key, value)
            return self.build(tp, value, key)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            for option in args:
                try:
                    return self.coerce(value, option, key)
                except _TypeMismatch as err:
                    if err.key != key:  # the mismatch is inside the value: report that one
                        raise
            raise self._mismatch(key, _type_name(tp), value)
        if origin is Literal:
            # Compare types too: YAML `true` must not match a Literal[1].
            if any(value == a and type(value) is type(a) for a in args):
                return value
            raise self._mismatch(key, "one of " + ", ".join(repr(a) for a in args), value)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise self._mismatch(key, _type_name(tp), value)
            if origin is list or (len(args) == 2 and args[1] is Ellipsis):
                item_types = [args[0] if args else Any] * len(value)
            elif len(value) != len(args):
                raise self._mismatch(key, f"{_type_name(tp)} ({len(args)} items)", value)
            else:
                item_types = list(args)
            return origin(self.coerce(v, t, f"{key}[{i}]")
                          for i, (v, t) in enumerate(zip(value, item_types)))
        if origin is dict:
            if not isinstance(value, Mapping):
                raise self._mismatch(key, _type_name(tp), value)
            key_type, value_type = args or (Any, Any)
            return {self.coerce(k, key_type, f"{key}.{k}"): self.coerce(v, value_type, f"{key}.{k}")
                    for k, v in value.items()}
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # `lr: 1` means 1.0
        # bool is a subclass of int, but `epochs: true` is a mistake, not 1.
        if isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool):
            return value
        raise self._mismatch(key, _type_name(tp), value)

    def _mismatch(self, key: str, expected: str, value: Any) -> _TypeMismatch:
        return _TypeMismatch(key, f"{key}: expected {expected}, got {_typed_repr(value)} "
                                  f"(in {self.source_of(key)})")

    def _section_error(self, key: str, value: Any) -> ConfigError:
        return ConfigError(f"{key}: is a section, expected a mapping of its keys, "
                           f"got {_typed_repr(value)} (in {self.source_of(key)})")

    def _unknown_key(self, cls: type, prefix: str, name: str, source: str) -> ConfigError:
        names = list(_init_fields(cls))
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            hint = f"did you mean '{_join(prefix, close[0])}'?"
        else:
            # A key put in the wrong section (`lr:` at the top level) gets pointed to its home.
            keys_by_leaf: dict[str, str] = {}
            for row in sorted(describe(self.root), key=lambda row: row.key.count(".")):
                keys_by_leaf.setdefault(row.key.rpartition(".")[2], row.key)  # `lr`: train.lr, not train.lora.lr
            close = difflib.get_close_matches(name, list(keys_by_leaf), n=1)
            if close:
                hint = f"did you mean '{keys_by_leaf[close[0]]}'?"
            else:
                where = f"of '{prefix}'" if prefix else "at the top level"
                hint = f"valid keys {where}: {', '.join(names)}"
        return ConfigError(f"unknown key '{_join(prefix, name)}' in {source}; {hint}")

    def _check_error(self, cls: type, prefix: str, err: ValueError) -> ConfigError:
        # By convention the message starts with the field it is about: make that a dotted key.
        message = str(err)
        leading = re.match(r"\w+", message)
        field = leading.group(0) if leading and leading.group(0) in _init_fields(cls) else None
        if prefix:
            message = f"{prefix}.{message}" if field else f"{prefix}: {message}"
        return ConfigError(f"{message} (in {self._sources_of_section(prefix)})")

    def _sources_of_section(self, prefix: str) -> str:
        # A check may involve several keys of the section, so name everything that set them.
        if prefix and self.source_of(prefix) != self.file_source:
            return self.source_of(prefix)  # the whole section came from one override
        inside = [source for key, source in self.override_sources.items()
                  if not prefix or key.startswith(prefix + ".")]
        return ", ".join([self.file_source, *inside])


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)  # resolves string annotations (`from __future__ import annotations`)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _typed_repr(value: Any) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    """`float`, `int | None`, `list[float]`, `{float32,bfloat16}` (a Literal, argparse style)."""
    if tp is type(None):
        return "None"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        names = ("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{', '.join(names)}]"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- writing


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts and lists (what `load_config` reads back)."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in _init_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]  # safe_dump has no tuples
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML, in field order; `load_config` on it gives `cfg` back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train.lr": 5e-06, ...}`: one dotted key per non-section field (for MLflow params)."""
    flat = {}
    for name in _init_fields(type(cfg)):
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, _join(prefix, name)))
        else:
            flat[_join(prefix, name)] = _plain(value)
    return flat


# --------------------------------------------------------------------------- describing


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One key of a config tree, as `--help` lists it."""

    key: str
    """Dotted key, e.g. `train.lr`."""
    type: str
    """Readable type: `float`, `int | None`, `{float32,bfloat16}`; the class name of a section."""
    default: Any
    """Default value; `dataclasses.MISSING` for a required key, None for a section."""
    doc: str
    """The field's docstring."""
    is_section: bool
    """True for a nested config dataclass; its own keys follow it."""


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after the field in the class body (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe(cls: type, prefix: str = "") -> list[ConfigKey]:
    """Every key of a config class, sections first then their keys, in field order."""
    docs, hints = field_docs(cls), _type_hints(cls)
    rows = []
    for name, field in _init_fields(cls).items():
        key, tp = _join(prefix, name), hints[name]
        if dataclasses.is_dataclass(tp):
            rows.append(ConfigKey(key, tp.__name__, None, docs.get(name, ""), True))
            rows.extend(describe(tp, key))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        rows.append(ConfigKey(key, _type_name(tp), default, docs.get(name, ""), False))
    return rows


def format_help(cls: type) -> str:
    """The key table `--help` prints: key, type, default and docstring, grouped by section."""
    rows = describe(cls)
    leaves = [r for r in rows if not r.is_section]
    key_width = max((len(r.key) for r in leaves), default=0)
    type_width = max((len(r.type) for r in leaves), default=0)
    defaults = {r.key: "required" if r.default is dataclasses.MISSING else repr(r.default)
                for r in leaves}
    default_width = max((len(d) for d in defaults.values()), default=0)
    lines = ["config keys (override any with KEY=VALUE, e.g. train.lr=1e-5):"]
    for row in rows:
        if row.is_section:
            lines += ["", f"{row.key}: {row.doc}"]
            continue
        lines.append(f"  {row.key:<{key_width}}  {row.type:<{type_width}}  "
                     f"{defaults[row.key]:<{default_width}}  {row.doc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, *,
              description: str | None = None) -> T:
    """Parses `[--config PATH] [KEY=VALUE ...]` into a config; what every job's `main()` calls.

    Args:
        cls: The config dataclass, e.g. `ExperimentConfig`.
        argv: Arguments without the program name; None reads `sys.argv[1:]`.
        description: Shown above the key table by `--help`; jobs pass their `__doc__`.

    Returns:
        The loaded config. A bad file, key or value prints the error and exits with status 2,
        like any other command-line mistake; `--help` prints every key and exits with 0.
    """
    return parse_cli_with_flags(cls, argv, description=description)[0]


def parse_cli_with_flags(cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None,
                         flags: Mapping[str, str] | None = None) -> tuple[T, dict[str, bool]]:
    """`parse_cli` for entry points that also take on/off flags, e.g. a sweep's `--resume`.

    Args:
        flags: flag (`--resume`) -> its help text.

    Returns:
        The config, and flag -> whether it was given.
    """
    parser = argparse.ArgumentParser(description=description, epilog=format_help(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH",
                        help="YAML file of the experiment; without it every key has its default")
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides applied after the file, e.g. train.lr=1e-5")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    return cfg, {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in flags or {}}
