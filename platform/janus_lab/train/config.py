"""The fine-tuning experiment's config: what `jobs/finetune.py --config X.yaml` reads.

`ExperimentConfig` and its sections (model, data, masking, train with its LoRA section,
tracking, retry). `ModelConfig` is also the ingest's `model` section and `TrackingConfig` the
sweeps' `tracking`: a dataset is encoded for the model that trains on it, and a sweep's trials
log like any run. Loading, overrides and `--help` are `janus_lab.config`'s.
"""

import dataclasses
from typing import Literal

from janus_lab.config import check, check_fraction, check_non_negative, check_not_empty, check_positive
from janus_lab.retry import S3RetryConfig


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
        check_fraction(self, "t2i_text_drop", "ti2i_image_drop")


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
        check_not_empty(self, "uri")
        check_positive(self, "max_text_tokens", "shuffle_window_rows")


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
        check_non_negative(self, "rank")
        check_positive(self, "alpha", "lr")
        check(self, ["dropout"], lambda v: 0 <= v < 1, "in [0, 1)")
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
    eval_at_start: bool = True
    """Validate the starting model before the first step too (step 0 of every curve). Sweeps whose
    trials all start from the same base turn it off: each trial would measure the same model."""
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
        check_positive(self, "lr", "grad_clip", "epochs", "max_steps", "global_batch_size",
                       "micro_batch_size", "num_workers", "report_every", "checkpoint_every",
                       "keep_checkpoints", "world_eval_cfg_weight")
        check_non_negative(self, "weight_decay", "eval_every", "max_failures", "world_eval_samples")
        check_fraction(self, "warmup_ratio", "min_lr_ratio")
        check(self, ["betas"], lambda b: all(0 <= beta < 1 for beta in b), "two numbers in [0, 1)")
        check_not_empty(self, "storage_path")
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
        check_not_empty(self, "experiment")


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
        check_not_empty(self, "name")

