"""Data order and per-worker reads: is every optimizer step a mix of the whole dataset, and does
each worker read only its own part of an epoch?

    .venv/bin/python benchmarks/data_order.py                    # 2,048 records; ~5 min on 2 busy cores
    .venv/bin/python benchmarks/data_order.py --samples 1024     # quicker, fewer steps

It starts a throwaway local S3 (SeaweedFS, free ports) and a local Ray cluster, writes two
sources one after the other (`a/records.jsonl`: 75% text-to-image, then `b/records.jsonl`: 25%),
ingests them to S3 with `run_ingest` (not timed), and measures, on the 7B recipe's geometry
scaled down (7B: 8 workers x micro-batch 4 x 4 accumulation = 128 rows a step, 2,048-row
shards, so a shard lasts 16 steps; here `--workers` x `--micro-batch` x `--accumulation` rows a
step and shards of 16 steps):

Data order. For every optimizer step of one epoch (all workers' micro-batches of the step), the
share of T2I rows and the share of rows from source `a` against the dataset's: mean and largest
|deviation|, the share of steps holding one task only and the longest run of such steps. Three
ways of getting there, plus a reference:

- before: the shards as ingest wrote them until now (source order, one row group per shard),
  read as training did (shard order and rows inside a shard shuffled per epoch, rank r keeps
  rows r, r+W, ..., 16 micro-batches sorted by length together);
- reader only: the same source-order rows in small row groups of one split (ingest's writer
  without its mixed write order), read the new way (`epoch_part` + `read_part`, length grouping
  inside one step);
- after: the dataset as ingest now writes it (hash order of records), read the new way;
- uniform: steps drawn uniformly from the whole epoch (the published script's sampler),
  averaged over 50 seeded epochs.

Reads. Bytes each worker fetches from S3 in one epoch of the `after` dataset, counted at the
file handle (`ReadCounter` wraps the S3 file each Parquet read goes through), with W = 1, 2, 4
workers reading at once as W Ray tasks. Before, every worker read every shard and kept 1/W of
the rows; that is measured as one full read of the shards' training columns, and a run of W
workers read it W times. Also: what a worker resuming at the middle of its part fetches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

# The throwaway S3 + Ray set-up of the data-path benchmark next to this file.
from data_stream import log, model_for, start_ray, start_s3

SOURCES = {"a": 0.75, "b": 0.25}  # share of T2I records in each source


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048, help="records in all, half per source")
    parser.add_argument("--workers", type=int, default=4, help="W of the data-order measurement")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps-per-shard", type=int, default=16, help="shard size, in optimizer steps (7B: 16)")
    parser.add_argument("--rows-per-row-group", type=int, default=16,
                        help="ingest's row groups; 7B: 128 rows, one step (default here: one step too)")
    parser.add_argument("--window-rows", type=int, default=128,
                        help="data.shuffle_window_rows; 7B default 1024 rows = 8 row groups (here too)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- datasets


def write_two_sources(folder: Path, samples: int, seed: int) -> None:
    """Two JSONL sources of the sample scenes, `a/` then `b/`, with their own T2I shares and ids."""
    from janus_lab.data import write_sample_dataset

    for index, (name, t2i_share) in enumerate(SOURCES.items()):
        count = samples // len(SOURCES)
        num_t2i = round(count * t2i_share)
        write_sample_dataset(folder / name, layout="jsonl", seed=seed + index, num_t2i=num_t2i,
                             num_ti2i=count - num_t2i)
        path = folder / name / "records.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(r | {"id": f"{name}-{r['id']}"}) + "\n" for r in records))


def ingest(source: Path, uri: str, args: argparse.Namespace) -> None:
    from janus_lab.data import run_ingest
    from janus_lab.data.config import IngestConfig, IngestOutputConfig, IngestSourceConfig
    from janus_lab.train.config import ModelConfig

    rows_per_shard = args.steps_per_shard * args.workers * args.micro_batch * args.accumulation
    cfg = IngestConfig(source=IngestSourceConfig(format="jsonl", path=str(source)),
                       output=IngestOutputConfig(uri=uri, overwrite=True, rows_per_shard=rows_per_shard,
                                                 rows_per_row_group=args.rows_per_row_group),
                       model=ModelConfig(preset="debug", image_size=64))
    log(f"ingesting {args.samples} records into {uri} ({rows_per_shard}-row shards; not timed)")
    log(run_ingest(cfg).summary().splitlines()[0])


def write_in_source_order(after_uri: str, uri: str, rows_per_shard: int, rows_per_row_group: int | None) -> None:
    """The ingested rows again, in source order (source `a`'s file, then `b`'s, each in record
    order); `rows_per_row_group=None`: one row group per shard, splits mixed (the old writer)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from janus_lab.data.ingest import read_shards
    from janus_lab.data.schema import DatasetManifest
    from janus_lab.storage import pyarrow_filesystem

    manifest = DatasetManifest.read(after_uri)
    table = read_shards(after_uri)
    # Sample ids are "<source>-<task>_<number>": T2I records come first in each source file.
    table = table.take(pa.array(sorted(range(table.num_rows), key=lambda i: table["id"][i].as_py())))
    fs, root = pyarrow_filesystem(uri)
    shards = []
    for number, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        shard = table.slice(start, rows_per_shard)
        shards.append(f"part-{number:05d}.parquet")
        with pq.ParquetWriter(f"{root}/{shards[-1]}", shard.schema, filesystem=fs, compression="zstd") as writer:
            if rows_per_row_group is None:
                writer.write_table(shard)
                continue
            for split in ("train", "val"):
                rows = shard.filter(pc.equal(shard["split"], split))
                if rows.num_rows:
                    writer.write_table(rows, row_group_size=rows_per_row_group)
    dataclasses.replace(manifest, shards=shards).write(uri)


# --------------------------------------------------------------------------- orders


def old_rank_rows(uri: str, seed: int, epoch: int, world_size: int) -> list[list[dict]]:
    """The rows each rank trained on before: shards and rows in a shard shuffled, rank r keeps r, r+W, ..."""
    import pyarrow.parquet as pq

    from janus_lab.data.order import order_key
    from janus_lab.data.schema import DatasetManifest
    from janus_lab.data.stream import STREAM_COLUMNS
    from janus_lab.storage import pyarrow_filesystem

    manifest = DatasetManifest.read(uri)
    fs, root = pyarrow_filesystem(uri)
    rows = []
    for name in sorted(manifest.shards, key=lambda n: order_key(seed, epoch, f"shard:{n}")):
        table = pq.read_table(f"{root}/{name}", filesystem=fs, columns=[*STREAM_COLUMNS, "source"])
        shard = [row for row in table.to_pylist() if row["split"] == "train"]
        rows.extend(sorted(shard, key=lambda row: order_key(seed, epoch, row["id"])))
    return [rows[rank::world_size] for rank in range(world_size)]


def new_rank_rows(uri: str, seed: int, epoch: int, world_size: int, window_rows: int) -> list[list[dict]]:
    from janus_lab.data.stream import STREAM_COLUMNS, epoch_part, read_part, scan_layout

    layout = scan_layout(uri)
    return [list(read_part(layout, epoch_part(layout, seed, epoch, rank, world_size), seed, epoch, window_rows,
                           columns=[*STREAM_COLUMNS, "source"]))
            for rank in range(world_size)]


def steps_of(rank_rows: list[list[dict]], lengths: dict[str, int], micro: int, accumulation: int,
             group_window: int, steps: int) -> list[list[dict]]:
    """Each optimizer step's rows: per rank, windows of `group_window` micro-batches sorted by
    length and cut into micro-batches (as `micro_batches` does), `accumulation` of them a step."""
    per_step = [[] for _ in range(steps)]
    for rows in rank_rows:
        window = micro * group_window
        batches = []
        for start in range(0, len(rows), window):
            chunk = rows[start:start + window]
            chunk = sorted(enumerate(chunk[:len(chunk) - len(chunk) % micro]),
                           key=lambda item: (lengths[item[1]["id"]], item[0]))
            batches.extend([row for _, row in chunk[i:i + micro]] for i in range(0, len(chunk), micro))
        for step in range(steps):
            for batch in batches[step * accumulation:(step + 1) * accumulation]:
                per_step[step].extend(batch)
    return per_step


def sequence_lengths(rows: list[dict], builder) -> dict[str, int]:
    from janus_lab.data.stream import StreamSpec, tokenize_row

    spec = StreamSpec(epoch=0, rank=0, world_size=1, micro_batch_size=1)
    return {row["id"]: len(tokenize_row(row, builder, spec)[0]) for row in rows}


def mix(steps: list[list[dict]], dataset: list[dict]) -> dict[str, float]:
    """Deviation of each step's T2I and source-a shares from the dataset's; runs of one-task steps."""
    def share(rows, test):
        return sum(map(test, rows)) / len(rows)

    is_t2i = lambda row: row["task"] == "t2i"  # noqa: E731
    is_a = lambda row: row["source"].endswith("a/records.jsonl")  # noqa: E731
    t2i = np.array([share(step, is_t2i) for step in steps])
    source = np.array([share(step, is_a) for step in steps])
    t2i_dev, source_dev = np.abs(t2i - share(dataset, is_t2i)), np.abs(source - share(dataset, is_a))
    single = (t2i == 0) | (t2i == 1)
    run = longest = 0
    for one_task in single:
        run = run + 1 if one_task else 0
        longest = max(longest, run)
    return {"t2i_mean": t2i_dev.mean(), "t2i_max": t2i_dev.max(), "source_mean": source_dev.mean(),
            "source_max": source_dev.max(), "single": single.mean(), "run": longest}


def uniform_mix(dataset: list[dict], per_step: int, steps: int, seed: int, epochs: int = 50) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    results = [mix([[dataset[i] for i in order[s * per_step:(s + 1) * per_step]] for s in range(steps)], dataset)
               for order in (rng.permutation(len(dataset)) for _ in range(epochs))]
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


# --------------------------------------------------------------------------- reads


def read_bytes_per_rank(uri: str, world_size: int, seed: int, window_rows: int) -> list[tuple[int, int]]:
    """(bytes fetched, rows) of each rank's part of epoch 0, the ranks reading at once as Ray tasks."""
    import ray

    from janus_lab.data.stream import scan_layout

    @ray.remote(num_cpus=0.5)
    def read_rank(layout, rank: int) -> tuple[int, int]:
        from janus_lab.data.stream import ReadCounter, epoch_part, read_part
        from janus_lab.storage import pyarrow_filesystem

        counter = ReadCounter(pyarrow_filesystem(layout.uri)[0])
        part = epoch_part(layout, seed, 0, rank, world_size)
        rows = sum(1 for _ in read_part(layout, part, seed, 0, window_rows, filesystem=counter))
        return counter.bytes_read, rows

    layout = ray.put(scan_layout(uri))
    return ray.get([read_rank.remote(layout, rank) for rank in range(world_size)])


def whole_read_bytes(uri: str) -> int:
    """Bytes of one read of every shard's training columns: what each worker fetched before."""
    import pyarrow.parquet as pq

    from janus_lab.data.schema import DatasetManifest
    from janus_lab.data.stream import STREAM_COLUMNS, ReadCounter
    from janus_lab.storage import pyarrow_filesystem

    fs, root = pyarrow_filesystem(uri)
    counter = ReadCounter(fs)
    for name in DatasetManifest.read(uri).shards:
        with counter.open_input_file(f"{root}/{name}") as handle:
            pq.read_table(handle, columns=STREAM_COLUMNS)
    return counter.bytes_read


def resume_bytes(uri: str, builder, args: argparse.Namespace) -> tuple[int, int]:
    """Bytes rank 0 of W fetches for its whole part, and when resuming at the middle of it."""
    from janus_lab.data.stream import ReadCounter, StreamSpec, epoch_micro_batches, scan_layout
    from janus_lab.storage import pyarrow_filesystem

    layout = scan_layout(uri)
    spec = StreamSpec(epoch=0, rank=0, world_size=args.workers, micro_batch_size=args.micro_batch,
                      group_window=args.accumulation, shuffle_seed=args.seed, shuffle_window_rows=args.window_rows)
    fetched = []
    half = layout.rows("train") // args.workers // args.micro_batch // 2 // args.accumulation * args.accumulation
    for skip in (0, half):
        counter = ReadCounter(pyarrow_filesystem(uri)[0])
        for _ in epoch_micro_batches(layout, builder, spec, skip=skip, filesystem=counter):
            pass
        fetched.append(counter.bytes_read)
    return fetched[0], fetched[1]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log(f"load average {os.getloadavg()[0]:.1f}")
    import ray

    from janus_lab.data.schema import DatasetManifest
    from janus_lab.data.stream import StreamSpec, epoch_micro_batches, scan_layout, steps_per_epoch
    from janus_lab.model import SequenceBuilder

    stack = None
    with tempfile.TemporaryDirectory(prefix="janus-bench-order-") as tmp:
        work = Path(tmp)
        try:
            stack = start_s3(work / "stack")
            start_ray()
            base = f"s3://{stack.bucket}/benchmarks/data-order"
            write_two_sources(work / "source", args.samples, args.seed)
            uris = {"after": f"{base}/after", "before": f"{base}/before", "reader only": f"{base}/reader-only"}
            ingest(work / "source", uris["after"], args)
            rows_per_shard = args.steps_per_shard * args.workers * args.micro_batch * args.accumulation
            write_in_source_order(uris["after"], uris["before"], rows_per_shard, None)
            write_in_source_order(uris["after"], uris["reader only"], rows_per_shard, args.rows_per_row_group)
            manifest = DatasetManifest.read(uris["after"])
            tokens = int(manifest.model["num_image_tokens"])
            builder = SequenceBuilder(model_for(manifest).processor.tokenizer, tokens)

            # ---- data order
            W, micro, accumulation = args.workers, args.micro_batch, args.accumulation
            per_step = W * micro * accumulation
            rank_rows = {"before": old_rank_rows(uris["before"], args.seed, 0, W)}
            for name in ("reader only", "after"):
                rank_rows[name] = new_rank_rows(uris[name], args.seed, 0, W, args.window_rows)
            dataset = [row for rows in rank_rows["before"] for row in rows]  # every train row
            steps = steps_per_epoch(len(dataset), W, micro, accumulation)
            lengths = sequence_lengths(dataset, builder)
            results = {
                "before": mix(steps_of(rank_rows["before"], lengths, micro, accumulation, 16, steps), dataset),
                **{name: mix(steps_of(rank_rows[name], lengths, micro, accumulation, accumulation, steps), dataset)
                   for name in ("reader only", "after")},
                "uniform": uniform_mix(dataset, per_step, steps, args.seed),
            }
            # The library's own batches agree with the steps counted here (rank 0, T2I per step).
            spec = StreamSpec(epoch=0, rank=0, world_size=W, micro_batch_size=micro, group_window=accumulation,
                              shuffle_seed=args.seed, shuffle_window_rows=args.window_rows)
            ours = [int(b["task_is_t2i"].sum())
                    for b in epoch_micro_batches(scan_layout(uris["after"]), builder, spec, limit=steps * accumulation)]
            counted = steps_of(rank_rows["after"][:1], lengths, micro, accumulation, accumulation, steps)
            assert [sum(ours[s * accumulation:(s + 1) * accumulation]) for s in range(steps)] == \
                [sum(row["task"] == "t2i" for row in step) for step in counted], "step accounting differs"

            # ---- reads
            whole = whole_read_bytes(uris["after"])
            reads = {w: read_bytes_per_rank(uris["after"], w, args.seed, args.window_rows) for w in (1, 2, 4)}
            full, resumed = resume_bytes(uris["after"], builder, args)
        finally:
            ray.shutdown()
            if stack is not None:
                stack.down(timeout_s=3.0)

    print()
    t2i = sum(row["task"] == "t2i" for row in dataset) / len(dataset)
    print(f"data order: {len(dataset)} train rows, T2I share {t2i:.3f}; {W} workers x micro-batch {micro} x "
          f"{accumulation} accumulation = {per_step} rows a step, {steps} steps; shards of {rows_per_shard} rows "
          f"({args.steps_per_shard} steps); row groups of {args.rows_per_row_group}; shuffle window "
          f"{args.window_rows} rows")
    print(f"{'':12s} {'T2I share |dev|':>17s} {'source-a |dev|':>16s} {'one-task':>9s} {'longest':>8s}")
    print(f"{'':12s} {'mean':>8s} {'max':>8s} {'mean':>7s} {'max':>8s} {'steps':>9s} {'run':>8s}")
    for name, r in results.items():
        print(f"{name:12s} {r['t2i_mean']:8.3f} {r['t2i_max']:8.3f} {r['source_mean']:7.3f} {r['source_max']:8.3f} "
              f"{r['single']:9.1%} {r['run']:8.0f}")
    for name in ("before", "reader only", "after"):
        print(f"mean |T2I dev| / uniform draw's: {name} {results[name]['t2i_mean'] / results['uniform']['t2i_mean']:.2f}")
    print(f"after / before, mean |T2I dev|: {results['after']['t2i_mean'] / results['before']['t2i_mean']:.2f}")

    print()
    print(f"reads of one epoch (after dataset; before: every worker read all shards = {whole:,} bytes)")
    print(f"{'W':>2s} {'bytes per worker':>36s} {'total':>12s} {'before total':>13s} {'total / before':>15s}")
    for w, per_rank in reads.items():
        total = sum(b for b, _ in per_rank)
        print(f"{w:2d} {', '.join(f'{b:,}' for b, _ in per_rank):>36s} {total:12,} {w * whole:13,} "
              f"{total / (w * whole):15.2f}")
    print(f"total at W=4 / total at W=1: {sum(b for b, _ in reads[4]) / sum(b for b, _ in reads[1]):.3f}")
    print(f"resume at the middle of rank 0's part (W={W}): fetches {resumed:,} of {full:,} bytes "
          f"({resumed / full:.2f})")


if __name__ == "__main__":
    main()
