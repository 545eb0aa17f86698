"""The dataset ingest's config: what `jobs/ingest.py --config X.yaml` reads (docs/design.md, "Data schema")."""

import dataclasses
from typing import Literal

from janus_lab.config import check_fraction, check_non_negative, check_not_empty, check_positive
from janus_lab.retry import S3RetryConfig
from janus_lab.train.config import ModelConfig


@dataclasses.dataclass
class IngestSourceConfig:
    """The raw dataset an ingest reads."""

    format: Literal["sharegpt4o", "echo4o", "jsonl"] = "sharegpt4o"
    """Layout: ShareGPT-4o-Image (JSON + `*_part_N.tar`), Echo-4o-Image (JSONL + `.tar.gz`), or plain JSONL."""
    path: str = "data/sample"
    """Folder of the raw dataset, local or `s3://`; image paths in records are relative to it."""

    def __post_init__(self) -> None:
        check_not_empty(self, "path")


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
        check_not_empty(self, "uri")
        check_positive(self, "rows_per_shard", "rows_per_row_group")


@dataclasses.dataclass
class IngestLimitsConfig:
    """Bounds on what a record may contain; a record outside them is rejected with a reason."""

    max_image_pixels: int = 4096 * 4096
    """Largest width x height an image header may claim; checked before any pixel is decoded."""
    max_text_tokens: int = 256
    """Longest prompt in tokens of the model's tokenizer; fine-tunes of the dataset need at least this."""

    def __post_init__(self) -> None:
        check_positive(self, "max_image_pixels", "max_text_tokens")


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
        check_fraction(self, "val_fraction")
        check_non_negative(self, "val_count")
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
    """Records per VQ-encoder call, at most (the image-reading tasks cut their tables at it)."""
    records_per_task: int = 64
    """Records per image-reading task (a `.tar.gz` part is always read by one task). On a CPU
    cluster a task runs inside one encoder actor, so tasks must be several per actor to keep
    every actor busy."""

    def __post_init__(self) -> None:
        check_positive(self, "num_encoder_actors", "batch_size", "records_per_task")


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

