"""What an ingested dataset is made of: the shard row, the rejects table and the manifest.

A dataset is a folder (local or `s3://`) holding

    part-00000.parquet ...   shards of `SHARD_SCHEMA` rows, zstd-compressed
    _rejects.parquet         every record that was not ingested, with the reason (`REJECTS_SCHEMA`)
    _manifest.json           `DatasetManifest`, written last: a dataset without it is unfinished

Readers go through the manifest's shard list, never through a folder listing, so a shard that
an interrupted ingest left behind is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa
from pyarrow import fs as pafs

from janus_lab.storage import pyarrow_filesystem

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
REJECTS_NAME = "_rejects.parquet"
SHARD_PREFIX = "part-"
TASKS = ("t2i", "ti2i")
SPLITS = ("train", "val")

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),  # "t2i" | "ti2i"
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("output_codes", pa.list_(pa.int16()), nullable=False),  # N codes, raster order
    pa.field("input_codes", pa.list_(pa.list_(pa.int16())), nullable=False),  # K x N
    pa.field("input_pixels", pa.list_(pa.binary()), nullable=False),  # K PNGs at the model's side
    pa.field("source", pa.string(), nullable=False),  # "<format>:<file the record came from>"
    pa.field("split", pa.string(), nullable=False),  # "train" | "val"
])

REJECTS_SCHEMA = pa.schema([
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("record_index", pa.int64(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # "<category>: <detail>"
])


# Every rejection reason reads "<category>: <detail>", the category one of these.
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
PATH_ESCAPE = "path escapes source root"
IMAGE_TOO_LARGE = "image too large"
EMPTY_PROMPT = "empty prompt"
PROMPT_TOO_LONG = "prompt too long"
NO_INPUT_IMAGE = "no input image"
DUPLICATE_ID = "duplicate id"
MALFORMED_RECORD = "malformed record"
REJECT_CATEGORIES = (MISSING_IMAGE, UNREADABLE_IMAGE, PATH_ESCAPE, IMAGE_TOO_LARGE, EMPTY_PROMPT,
                     PROMPT_TOO_LONG, NO_INPUT_IMAGE, DUPLICATE_ID, MALFORMED_RECORD)


@dataclass(frozen=True)
class Reject:
    """A record that was not ingested: one row of `_rejects.parquet`."""

    source_file: str
    """File of the record, relative to the source folder."""
    record_index: int
    """Position of the record in that file (array index for JSON, line index for JSONL)."""
    id: str
    """The record's id (given, or derived from its file and output image)."""
    reason: str
    """`"<category>: <detail>"`, the category one of `REJECT_CATEGORIES`."""

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0]


def shard_name(index: int) -> str:
    """`part-00007.parquet`."""
    return f"{SHARD_PREFIX}{index:05d}.parquet"


def _split_hash(sample_id: str, seed: int) -> float:
    """A stable draw in [0, 1) per (seed, sample id)."""
    digest = hashlib.blake2b(f"split:{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_of(sample_id: str, seed: int, val_fraction: float) -> str:
    """"val" for a stable `val_fraction` of sample ids, "train" for the rest.

    The split hangs on the id alone, so it survives re-ingesting, reordering or adding records.
    """
    return "val" if _split_hash(sample_id, seed) < val_fraction else "train"


def assign_splits(sample_ids: Sequence[str], seed: int, val_fraction: float | None,
                  val_count: int | None = None) -> list[str]:
    """The split of each id: a fraction (`split_of`), or exactly `val_count` ids in `val`.

    By count, `val` takes the `val_count` ids of lowest split hash (all of them when there are
    fewer), so the choice depends on the set of ids, not on their order. Adding records can move
    an id from `val` to `train` (a new id may hash lower), never from `train` to `val`.

    Args:
        sample_ids: distinct ids.
        seed: seed of the split hash.
        val_fraction: share of ids in `val` (used when `val_count` is None).
        val_count: number of ids in `val`, or None to split by fraction.
    """
    if val_count is None:
        return [split_of(i, seed, val_fraction or 0.0) for i in sample_ids]
    ranked = sorted(range(len(sample_ids)), key=lambda k: (_split_hash(sample_ids[k], seed), sample_ids[k]))
    held = set(ranked[:val_count])
    return ["val" if k in held else "train" for k in range(len(sample_ids))]


def empty_counts() -> dict[str, dict[str, int]]:
    """`{task: {split: 0}}` for every task and split, so counts always have the same shape."""
    return {task: {split: 0 for split in SPLITS} for task in TASKS}


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class DatasetManifest:
    """`_manifest.json`: what a finished dataset holds and how it was made."""

    source: dict
    """`{"format": ..., "path": ...}` of the raw dataset."""
    model: dict
    """`{"preset", "weights", "init_seed", "image_size", "num_image_tokens", "fingerprint"}`; the
    fingerprint is `vq_fingerprint` of the VQ tokenizer and text tokenizer that made the codes
    (fine-tuning refuses a model whose tokenizers differ); None for codes no tokenizer made."""
    counts: dict[str, dict[str, int]]
    """Rows per task and split: `{"t2i": {"train": n, "val": m}, "ti2i": {...}}`."""
    rows: int
    """Rows over all shards."""
    shards: list[str]
    """Shard file names, relative to the dataset folder."""
    rejects: int
    """Rows of `_rejects.parquet`."""
    val_fraction: float | None
    """Share of ids hashed into `val`; None when the split is by count."""
    seed: int
    """Seed of the split hash."""
    val_count: int | None = None
    """Ids asked for in `val` when the split is by count (the counts say how many made it); else None."""
    limits: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per ingest limit, its value and the records it rejected:
    `{"max_text_tokens": {"limit": 256, "rejected": 3}, "max_image_pixels": {...}}`."""
    schema_version: int = SCHEMA_VERSION
    """Version of `SHARD_SCHEMA` the shards follow."""
    created: str = field(default_factory=_utc_now)
    """When the ingest finished, ISO 8601 in UTC."""

    def split_rows(self, split: str) -> int:
        """Rows of one split (`train` or `val`), summed over tasks."""
        return sum(int(per_split.get(split, 0)) for per_split in self.counts.values())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DatasetManifest":
        """Parses a manifest.

        Raises:
            ValueError: the text is not a manifest of a schema version this code reads.
        """
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        # Fields added since (with defaults) may be absent from manifests written before them.
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted((required | {"schema_version"}) - set(data))
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}")
        if data["schema_version"] != SCHEMA_VERSION:
            raise ValueError(f"manifest has schema version {data['schema_version']}; this code reads "
                             f"version {SCHEMA_VERSION}: re-ingest the dataset")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, uri: str) -> "DatasetManifest":
        """Reads `_manifest.json` of the dataset at `uri` (local folder or `s3://`).

        Raises:
            FileNotFoundError: no manifest: not a dataset, or an ingest that did not finish.
        """
        fs, root = pyarrow_filesystem(uri)
        path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{uri} has no {MANIFEST_NAME}: not an ingested dataset, or its ingest "
                                    "did not finish (ingest it with jobs/ingest.py)")
        with fs.open_input_stream(path) as stream:
            return cls.from_json(stream.read().decode())

    def write(self, uri: str) -> None:
        """Writes `_manifest.json` into the dataset at `uri` (one PUT on S3, so it appears whole)."""
        fs, root = pyarrow_filesystem(uri)
        fs.create_dir(root, recursive=True)
        path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
        if isinstance(fs, pafs.LocalFileSystem):  # written beside and renamed, to appear whole too
            staging = f"{path}.{uuid.uuid4().hex}.tmp"
            with fs.open_output_stream(staging) as out:
                out.write(self.to_json().encode())
            fs.move(staging, path)
            return
        with fs.open_output_stream(path) as out:
            out.write(self.to_json().encode())
