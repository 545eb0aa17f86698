"""Streaming ingested shards into model-ready training batches (docs/design.md, "Data schema", "Training").

An epoch is laid out over Parquet *row groups* (ingest writes small ones, and never mixes train
and validation rows in one):

    driver   `scan_layout`: every shard's footer and the split counts of each row group, read once
    epoch    `epoch_part`:  a seeded permutation of the train row groups, cut into W equal runs of
             rows; rank r reads only run r (its own 1/W of the epoch, nothing else)
    worker   `read_part`:   its row groups in windows of about `shuffle_window_rows` rows, each
             window's rows shuffled, the next window fetched while this one trains
             `micro_batches`: tokenise, mask, sort by length inside one optimizer step, collate

So a worker's rows are a pure function of (dataset layout, seed, epoch, rank, world size, window),
which is what exact resume needs: a checkpoint stores how many micro-batches of the epoch a rank
has consumed, and the restarted run skips exactly those, without fetching the windows before them.
Each optimizer step draws from W windows of row groups spread over the whole dataset, and ingest
writes rows in a seeded global order, so a step's mix of tasks and sources is the dataset's.
Workers read with pyarrow directly, not through Ray Data: its split of one stream across
workers (`streaming_split`) hands rows out dynamically, which no resume can replay, and an
unsplit dataset per worker has every worker read the whole epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from janus_lab.data.order import ShuffleWithinBlock, order_key
from janus_lab.data.schema import DatasetManifest
from janus_lab.model.sequence import SequenceBuilder, TokenizedSample, collate_samples, draw_mask_decision
from janus_lab.retry import S3RetryConfig
from janus_lab.retry import with_s3_retries
from janus_lab.storage import pyarrow_filesystem

STREAM_COLUMNS = ["id", "task", "prompt", "output_codes", "input_codes", "input_pixels", "split"]


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a shard, and how many of its rows each split has."""

    shard: str
    index: int
    train: int
    val: int

    def rows(self, split: str) -> int:
        return self.train if split == "train" else self.val


@dataclass
class DatasetLayout:
    """Every row group of an ingested dataset with its split counts, and the shards' footers.

    The driver reads it once (`scan_layout`) and hands it to every worker, so that a worker
    fetches nothing but the row groups it trains on.
    """

    uri: str
    row_groups: list[RowGroup]
    footers: dict[str, pq.FileMetaData]

    def rows(self, split: str) -> int:
        return sum(group.rows(split) for group in self.row_groups)

    def digest(self) -> str:
        """Names the layout: a data position counts rows of this layout and no other."""
        text = "\n".join(f"{g.shard}#{g.index}:{g.train}:{g.val}" for g in self.row_groups)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def scan_layout(uri: str, manifest: DatasetManifest | None = None, threads: int = 16) -> DatasetLayout:
    """Reads the footer of every shard and counts each row group's rows per split.

    A row group of one split says so in its footer statistics (ingest writes those); in shards
    of older ingests, which mix splits in a row group, its `split` column is read.

    Args:
        uri: dataset root (local path or `s3://`).
        manifest: its `_manifest.json`, when already read.
        threads: footers fetched at once.
    """
    manifest = manifest or DatasetManifest.read(uri)
    fs, root = pyarrow_filesystem(uri)
    root = root.rstrip("/")

    def scan(shard: str) -> tuple[pq.FileMetaData, list[RowGroup]]:
        path = f"{root}/{shard}"
        footer = pq.read_metadata(path, filesystem=fs)
        column = [footer.schema.column(i).path for i in range(footer.num_columns)].index("split")
        groups = []
        for index in range(footer.num_row_groups):
            meta = footer.row_group(index)
            stats = meta.column(column).statistics
            if stats is not None and stats.has_min_max and stats.min == stats.max:
                counts = {stats.min: meta.num_rows}
            else:
                with fs.open_input_file(path) as handle:
                    splits = pq.ParquetFile(handle, metadata=footer).read_row_group(index, columns=["split"])
                counts = {value: splits["split"].to_pylist().count(value) for value in ("train", "val")}
            groups.append(RowGroup(shard, index, counts.get("train", 0), counts.get("val", 0)))
        return footer, groups

    with ThreadPoolExecutor(max_workers=threads) as pool:
        scanned = list(pool.map(scan, manifest.shards))
    return DatasetLayout(uri=uri, row_groups=[g for _, groups in scanned for g in groups],
                         footers={shard: footer for shard, (footer, _) in zip(manifest.shards, scanned)})


def epoch_order_signature(layout: DatasetLayout, shuffle_seed: int, window_rows: int) -> str:
    """What, besides the batch geometry, decides which rows a data position points at."""
    return f"data order seed {shuffle_seed}, shuffle window {window_rows} rows, dataset layout {layout.digest()}"


# --------------------------------------------------------------------------- an epoch's parts


@dataclass(frozen=True)
class RowGroupSlice:
    """Rows [start, stop) of one split of a row group, counted in file order."""

    group: RowGroup
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def epoch_part(layout: DatasetLayout, seed: int, epoch: int, rank: int, world_size: int) -> list[RowGroupSlice]:
    """The train rows rank `rank` of `world_size` reads in one epoch.

    The train row groups, in a seeded order of the epoch, are cut into `world_size` runs of
    `rows // world_size` rows each: parts are disjoint, equal, and together cover the epoch
    (but for fewer than `world_size` rows). A row group on a cut is read by both neighbours,
    each keeping its own rows.
    """
    groups = sorted((g for g in layout.row_groups if g.train),
                    key=lambda g: order_key(seed, epoch, f"rowgroup:{g.shard}#{g.index}"))
    per_rank = sum(g.train for g in groups) // world_size
    begin, end = rank * per_rank, (rank + 1) * per_rank
    part, offset = [], 0
    for group in groups:
        low, high = max(begin, offset), min(end, offset + group.train)
        if low < high:
            part.append(RowGroupSlice(group, low - offset, high - offset))
        offset += group.train
        if offset >= end:
            break
    return part


def shuffle_windows(part: list[RowGroupSlice], window_rows: int) -> list[list[RowGroupSlice]]:
    """Consecutive slices of a part, grouped into windows of at least `window_rows` rows (the last may be short)."""
    windows, current, rows = [], [], 0
    for piece in part:
        current.append(piece)
        rows += len(piece)
        if rows >= window_rows:
            windows.append(current)
            current, rows = [], 0
    if current:
        windows.append(current)
    return windows


# --------------------------------------------------------------------------- reading


class ReadCounter:
    """Opens files through a pyarrow filesystem and adds up the bytes read from them.

    Pass it as `filesystem` to the readers below to measure what a worker fetches from S3.
    """

    def __init__(self, filesystem):
        self.filesystem = filesystem
        self.bytes_read = 0
        self._lock = threading.Lock()

    def open_input_file(self, path: str) -> "_CountedFile":
        return _CountedFile(self.filesystem.open_input_file(path), self)

    def add(self, count: int) -> None:
        with self._lock:
            self.bytes_read += count


class _CountedFile(io.RawIOBase):
    def __init__(self, inner, counter: ReadCounter):
        super().__init__()
        self.inner, self.counter = inner, counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = 0) -> int:
        return self.inner.seek(position, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read() if size is None or size < 0 else self.inner.read(size)
        self.counter.add(len(data))
        return data

    def close(self) -> None:
        self.inner.close()
        super().close()


class ShardReader:
    """Reads slices of row groups of a dataset, with the footers its layout holds.

    Args:
        layout: the dataset's layout.
        filesystem: what opens the shard files (default: the dataset's own filesystem); a
            `ReadCounter` counts the bytes.
        columns: columns to read.
        retry: how long a window's read waits out an S3 outage (`S3RetryConfig`); a window is
            read again whole, so a retry never yields a row twice.
    """

    def __init__(self, layout: DatasetLayout, filesystem=None, columns: list[str] = STREAM_COLUMNS,
                 retry: S3RetryConfig | None = None):
        fs, root = pyarrow_filesystem(layout.uri)
        self.layout, self.filesystem, self.root = layout, filesystem or fs, root.rstrip("/")
        self.columns = list(dict.fromkeys([*columns, "split"]))  # the split filter needs it
        self.retry = retry

    def read(self, slices: list[RowGroupSlice], split: str) -> pa.Table:
        """The rows of `split` in each slice, concatenated in the order given."""
        shards = sorted({piece.group.shard for piece in slices})
        where = f"{self.layout.uri.rstrip('/')}/{shards[0]}" + (f" (+{len(shards) - 1} shards)" if len(shards) > 1 else "")
        return with_s3_retries(lambda: self._read_once(slices, split), "reading row groups of", where, self.retry)

    def _read_once(self, slices: list[RowGroupSlice], split: str) -> pa.Table:
        tables = []
        with contextlib.ExitStack() as stack:
            files: dict[str, pq.ParquetFile] = {}
            for piece in slices:
                shard = piece.group.shard
                if shard not in files:
                    handle = stack.enter_context(self.filesystem.open_input_file(f"{self.root}/{shard}"))
                    # The footer comes from the layout: opening a shard fetches no bytes.
                    files[shard] = pq.ParquetFile(handle, metadata=self.layout.footers[shard], pre_buffer=True)
                table = files[shard].read_row_group(piece.group.index, columns=self.columns)
                if piece.group.rows(split) != table.num_rows:
                    table = table.filter(pc.equal(table["split"], split))
                tables.append(table.slice(piece.start, len(piece)))
        return pa.concat_tables(tables)


def read_part(layout: DatasetLayout, part: list[RowGroupSlice], seed: int, epoch: int, window_rows: int, *,
              skip_rows: int = 0, filesystem=None, columns: list[str] = STREAM_COLUMNS,
              retry: S3RetryConfig | None = None) -> Iterator[dict]:
    """The rows of one rank's part of an epoch, in the epoch's order.

    Row groups are read a window at a time (`shuffle_windows`); a window's rows are shuffled by
    their seeded hash, and the next window is fetched in a background thread meanwhile.

    Args:
        layout, part: the dataset's layout and this rank's part (`epoch_part`).
        seed, epoch: fix the shuffle.
        window_rows: rows per shuffle window.
        skip_rows: leading rows to leave out (a resume); windows wholly before them are not fetched.
        filesystem, columns, retry: see `ShardReader`.
    """
    windows = shuffle_windows(part, window_rows)
    while windows and skip_rows >= (rows := sum(len(piece) for piece in windows[0])):
        skip_rows -= rows
        windows.pop(0)
    if not windows:
        return
    reader = ShardReader(layout, filesystem, columns, retry)
    shuffle = ShuffleWithinBlock(seed, epoch)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as pool:
        pending = pool.submit(reader.read, windows[0], "train")
        for index in range(len(windows)):
            table = pending.result()
            if index + 1 < len(windows):
                pending = pool.submit(reader.read, windows[index + 1], "train")
            yield from shuffle(table).to_pylist()[skip_rows:]
            skip_rows = 0


def read_split(layout: DatasetLayout, split: str, filesystem=None,
               columns: list[str] = STREAM_COLUMNS, retry: S3RetryConfig | None = None) -> list[dict]:
    """Every row of one split, in file order (the validation set every rank evaluates)."""
    slices = [RowGroupSlice(g, 0, g.rows(split)) for g in layout.row_groups if g.rows(split)]
    return ShardReader(layout, filesystem, columns, retry).read(slices, split).to_pylist() if slices else []


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class StreamSpec:
    """How a worker turns its part of an epoch into micro-batches."""

    epoch: int
    rank: int
    world_size: int
    micro_batch_size: int
    masking_seed: int = 0
    t2i_text_drop: float = 0.0
    ti2i_image_drop: float = 0.0
    group_window: int = 1
    """Micro-batches whose samples are sorted by length together, to cut padding. Training sets
    it to one optimizer step's micro-batches: sorting then regroups a step's samples without
    moving any into another step, so it cannot change what a step is a mix of."""
    shuffle_seed: int = 0
    """Seed of the epoch's order (`data.shuffle_seed`)."""
    shuffle_window_rows: int = 1024
    """Rows a worker reads and shuffles together (`data.shuffle_window_rows`)."""


def decode_input_pixels(png: bytes) -> torch.Tensor:
    """PNG bytes of a stored input image -> (3, H, W) floats in [-1, 1] for SigLIP."""
    from PIL import Image

    from janus_lab.model.vq import pixels_to_tensor

    with Image.open(io.BytesIO(png)) as image:
        return pixels_to_tensor(np.asarray(image.convert("RGB")))


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
    """Turns a rank's ordered rows into micro-batches.

    Rows are taken in windows of `group_window` micro-batches; inside a window samples are
    sorted by length and cut into micro-batches (less padding, same result on every run).

    Args:
        rows: this rank's rows, in order.
        builder: tokenises prompts into the sequence layout.
        spec: epoch, masking and batching.
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

    for row in rows:
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


def epoch_micro_batches(layout: DatasetLayout, builder: SequenceBuilder, spec: StreamSpec, *, skip: int = 0,
                        limit: int | None = None, filesystem=None,
                        retry: S3RetryConfig | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one epoch, read from its own part of the dataset only.

    Args:
        layout: the dataset's layout (`scan_layout`).
        builder, spec: see `micro_batches`.
        skip: micro-batches of the epoch already trained on. Whole length-grouping windows of
            them are skipped as rows, so the shuffle windows they fill are never fetched.
        limit: micro-batches of the epoch to stop after (counted from its start, like `skip`).
        filesystem, retry: see `ShardReader`.
    """
    part = epoch_part(layout, spec.shuffle_seed, spec.epoch, spec.rank, spec.world_size)
    skipped = skip // spec.group_window * spec.group_window
    if limit is not None and limit <= skipped:
        return
    rows = read_part(layout, part, spec.shuffle_seed, spec.epoch, spec.shuffle_window_rows,
                     skip_rows=skipped * spec.micro_batch_size, filesystem=filesystem, retry=retry)
    yield from micro_batches(rows, builder, spec, skip=skip - skipped,
                             limit=None if limit is None else limit - skipped)


def steps_per_epoch(num_rows: int, world_size: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch; every rank runs exactly this many."""
    return num_rows // (world_size * micro_batch_size * accumulation)
