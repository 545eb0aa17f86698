"""Streaming ingested shards into model-ready training batches (DESIGN.md §3, §4).

The order of an epoch is fixed by a seeded hash of each sample id, and rank r of W takes rows
r, r+W, r+2W, ... of it. That makes the data a rank sees a pure function of (seed, epoch,
rank, world size), which is what exact resume needs: a checkpoint stores how many micro-batches
of the epoch a rank has consumed, and the restarted run skips exactly those. Ray Data does the
reading, the split filter and the ordering; every worker receives the whole ordered stream
(`DataConfig(datasets_to_split=[])`) and keeps its own rows, since Ray's dynamic
`streaming_split` gives no reproducible assignment of rows to workers.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from janus_lab.data.order import ShuffleWithinBlock, order_key
from janus_lab.data.schema import MANIFEST_NAME
from janus_lab.model.sequence import SequenceBuilder, TokenizedSample, collate_samples, draw_mask_decision
from janus_lab.storage import pyarrow_filesystem

STREAM_COLUMNS = ["id", "task", "prompt", "output_codes", "input_codes", "input_pixels", "split"]


def read_manifest(uri: str) -> dict:
    """Reads `_manifest.json` of an ingested dataset.

    Raises:
        FileNotFoundError: no manifest (missing, or an ingest that never finished).
    """
    from pyarrow import fs as pafs

    fs, root = pyarrow_filesystem(uri)
    path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(
            f"{uri} has no {MANIFEST_NAME}: ingest it first (jobs/ingest.py); an ingest that was interrupted "
            "leaves no manifest"
        )
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def split_size(manifest: dict, split: str) -> int:
    """Rows of one split, summed over tasks, from the manifest counts."""
    return sum(int(per_split.get(split, 0)) for per_split in manifest["counts"].values())


def epoch_dataset(uri: str, split: str, epoch: int, seed: int):
    """A Ray Dataset of one split's rows in the seeded order of one epoch.

    The epoch order is a shuffle of the shard files followed by a shuffle of the rows inside
    each block, both keyed by a seeded hash: deterministic, and free of the all-to-all
    exchange a global sort or `random_shuffle` costs (ingest writes shards small enough for
    this to mix well). Read it with `preserve_order` so blocks arrive in that order.

    Args:
        uri: dataset root (local path or `s3://`), as written by the ingest job.
        split: "train" or "val".
        epoch: epoch number (the order changes every epoch).
        seed: data seed.
    """
    import ray.data

    # Ray 2.60's default (V2) Parquet datasource spends 10-20 s per execution in an idle file
    # listing task, and every epoch is an execution; the V1 reader starts in about a second.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    manifest = read_manifest(uri)
    fs, root = pyarrow_filesystem(uri)
    shards = sorted(manifest["shards"], key=lambda name: order_key(seed, epoch, f"shard:{name}"))
    paths = [f"{root.rstrip('/')}/{name}" for name in shards]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=STREAM_COLUMNS, shuffle=None)
    ds = ds.filter(expr=f"split == '{split}'")
    return ds.map_batches(ShuffleWithinBlock(seed, epoch), batch_format="pyarrow", batch_size=None)


@dataclass(frozen=True)
class StreamSpec:
    """How a worker turns its rows into micro-batches."""

    epoch: int
    rank: int
    world_size: int
    micro_batch_size: int
    masking_seed: int = 0
    t2i_text_drop: float = 0.0
    ti2i_image_drop: float = 0.0
    group_window: int = 16
    """Micro-batches whose samples are sorted by length together, to cut padding."""


def decode_input_pixels(png: bytes) -> torch.Tensor:
    """PNG bytes of a stored input image -> (3, H, W) floats in [-1, 1] for SigLIP."""
    from PIL import Image

    from janus_lab.model.vq import pixels_to_tensor

    with Image.open(io.BytesIO(png)) as image:
        return pixels_to_tensor(np.asarray(image.convert("RGB")))


def own_rows(rows: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Rows r, r+W, r+2W, ... of an ordered stream."""
    for index, row in enumerate(rows):
        if index % world_size == rank:
            yield row


def tokenize_row(row: dict, builder: SequenceBuilder, spec: StreamSpec) -> tuple[TokenizedSample, list[bytes]]:
    """One stored row -> a masked training sample and the PNGs of its SigLIP inputs."""
    stored = row.get("input_codes")
    input_codes = [list(codes) for codes in stored] if stored is not None else []
    mask = draw_mask_decision(str(row["id"]), spec.epoch, spec.masking_seed, str(row["task"]), len(input_codes),
                              spec.t2i_text_drop, spec.ti2i_image_drop)
    sample = builder.training_sample(str(row["prompt"]), list(row["output_codes"]), input_codes, mask)
    pixels = list(row["input_pixels"]) if sample.num_input_images else []
    return sample, pixels


def micro_batches(rows: Iterable[dict], builder: SequenceBuilder, spec: StreamSpec, *,
                  skip: int = 0, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Turns an ordered row stream into this rank's micro-batches.

    Rows are taken in windows of `group_window` micro-batches; inside a window samples are
    sorted by length and cut into micro-batches (less padding, same result on every run).

    Args:
        rows: the epoch's ordered rows (all ranks' rows; this rank keeps its own).
        builder: tokenises prompts into the sequence layout.
        spec: epoch, rank and batching.
        skip: micro-batches to skip (already trained on before a resume).
        limit: stop after this many micro-batches (ranks must run the same number of steps).

    Yields:
        Collated batches (see `collate_samples`) plus `task_is_t2i` (B,) for per-task metrics.
    """
    window_rows = spec.micro_batch_size * spec.group_window
    produced = 0
    window: list[dict] = []

    def flush(window_rows_: list[dict]) -> Iterator[dict[str, torch.Tensor]]:
        nonlocal produced
        usable = len(window_rows_) - len(window_rows_) % spec.micro_batch_size
        tokenized = [(tokenize_row(row, builder, spec), row["task"]) for row in window_rows_[:usable]]
        order = sorted(range(usable), key=lambda i: (len(tokenized[i][0][0]), i))
        for start in range(0, usable, spec.micro_batch_size):
            if limit is not None and produced >= limit:
                return
            chosen = [tokenized[i] for i in order[start:start + spec.micro_batch_size]]
            produced += 1
            if produced <= skip:
                continue
            samples = [sample for (sample, _), _ in chosen]
            pixels = [decode_input_pixels(png) for (_, pngs), _ in chosen for png in pngs]
            batch = collate_samples(samples, builder.special.pad, pixels)
            batch["task_is_t2i"] = torch.tensor([task == "t2i" for _, task in chosen])
            yield batch

    for row in own_rows(rows, spec.rank, spec.world_size):
        window.append(row)
        if len(window) == window_rows:
            # Whole windows before the resume point need no tokenising at all.
            if produced + spec.group_window <= skip:
                produced += spec.group_window
            else:
                yield from flush(window)
            window = []
            if limit is not None and produced >= limit:
                return
    if window:
        yield from flush(window)


def steps_per_epoch(num_rows: int, world_size: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch; every rank runs exactly this many."""
    return num_rows // (world_size * micro_batch_size * accumulation)
