"""Data-path speed: S3 shards streamed into training batches, against PNG + VQ encoding per step.

    .venv/bin/python benchmarks/data_stream.py                                   # debug model, 64 px; 2-3 min on 2 busy cores
    .venv/bin/python benchmarks/data_stream.py --image-size 384 --samples 24 --naive-samples 8
    .venv/bin/python benchmarks/data_stream.py --dataset-uri s3://janus-lab/datasets/sample --source-dir data/sample

Without `--dataset-uri` it starts a throwaway local S3 (SeaweedFS through `LocalStack`, free ports,
no MLflow, no Ray head) and a local Ray cluster (`ray.init(address="local", num_cpus=4)`), writes
the sample dataset (ShareGPT-4o-Image layout: JSON + `*_part_N.tar`), ingests it to `s3://` with
`run_ingest` (not timed), and then times, over the same micro-batch size:

- **stream** (ours): the layout scanned once (`scan_layout`, footers), then per epoch `read_part`
  (pyarrow reads the epoch's train row groups from S3 a shuffle window at a time, the next one
  prefetched) -> `micro_batches` (tokenise, mask, length-group, decode the stored SigLIP input
  PNGs, collate) -> a consumer, for `--epochs` epochs, as one worker (W = 1) reads it. "end to
  end" includes each epoch's wait for its first window, "after each first row" leaves it out.
- **naive** (the published `train_janus.py`): per sample, open the PNGs from the extracted source
  folder, RGB, resize to the model's side, VQ-encode the output and input images with the same
  frozen tokenizer the ingest used, tokenise and mask, collate. The published script encodes in
  its training step on the GPU; here everything runs on the CPU, in one process (its DataLoader
  workers would only overlap the PNG part). It reads local disk, the stream reads S3 over HTTP.

Bytes per sample: shard objects in S3 (sum of sizes / rows, split by column) against the raw
source images (output + input PNGs of a record). The sample images are flat-colour PNGs of
256-320 px that compress to 1-2 KB; the shards keep each input image as a PNG at the model's
side (for SigLIP) plus 2 bytes per code, so at 384 px they come out larger than this source.
Real sources (GPT-4o images of about 1024 px) are far larger per image than either.

With `--dataset-uri` nothing is started but the Ray cluster: the S3 settings come from the
environment (`source run/stack/env.sh`), the model from the manifest, and the naive path reads
`--source-dir` (a local ShareGPT-4o-Image folder; default: the manifest's source path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

RAY_CPUS = 4  # logical CPUs of the local cluster; more than the 2 cores on purpose (docs/platform-notes.md, "Ray")
SHAREGPT_FILES = ("text_to_image.json", "text_and_image_to_image.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, choices=[64, 384], default=64,
                        help="debug model's image side: 64 (16 codes) or 384 (576 codes, shape-true)")
    parser.add_argument("--samples", type=int, default=64,
                        help="records in the written sample dataset (60%% T2I, 40%% TI2I; ~10%% go to val)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs the stream path reads")
    parser.add_argument("--naive-samples", type=int, default=16,
                        help="samples the naive path prepares (rounded down to whole micro-batches)")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per collated batch, both paths")
    parser.add_argument("--rows-per-shard", type=int, default=32, help="ingest: rows per Parquet shard")
    parser.add_argument("--dataset-uri", default=None,
                        help="an ingested dataset to read instead of writing and ingesting the sample data")
    parser.add_argument("--source-dir", default=None,
                        help="with --dataset-uri: the raw ShareGPT-4o-Image folder for the naive path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.micro_batch < 1 or args.epochs < 1 or args.naive_samples < args.micro_batch:
        parser.error("need --micro-batch >= 1, --epochs >= 1 and --naive-samples >= --micro-batch")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- setup


def start_s3(run_dir: Path):
    """A throwaway SeaweedFS S3 on free ports; its client variables go into this process's env."""
    from janus_lab.stack import LocalStack

    stack = LocalStack.with_free_ports(run_dir, with_ray=False, with_mlflow=False, verbose=False)
    stack.up()
    os.environ.update(stack.env())
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
        os.environ.pop(name, None)  # a sourced env.sh of a `make up` stack would attract ray.init
    return stack


def start_ray() -> None:
    import ray
    import ray.data

    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False,
             runtime_env={"env_vars": aws} if aws else None)
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress lines instead
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one plan/finish line per execution otherwise


def write_and_ingest(work: Path, bucket: str, args: argparse.Namespace) -> tuple[str, Path]:
    """Writes the sample dataset and ingests it into the local S3; returns (dataset URI, source)."""
    from janus_lab.data import run_ingest, write_sample_dataset
    from janus_lab.data.config import IngestConfig, IngestOutputConfig, IngestSourceConfig
    from janus_lab.train.config import ModelConfig

    source = work / "source"
    num_t2i = round(args.samples * 0.6)
    write_sample_dataset(source, seed=args.seed, num_t2i=num_t2i, num_ti2i=args.samples - num_t2i)
    uri = f"s3://{bucket}/benchmarks/data-stream-{args.image_size}px"
    cfg = IngestConfig(source=IngestSourceConfig(format="sharegpt4o", path=str(source)),
                       output=IngestOutputConfig(uri=uri, overwrite=True, rows_per_shard=args.rows_per_shard),
                       model=ModelConfig(preset="debug", image_size=args.image_size))
    log(f"ingesting {args.samples} sample records ({args.image_size} px) into {uri} (not timed)")
    result = run_ingest(cfg)
    log(result.summary().splitlines()[0])
    return uri, source


def model_for(manifest):
    """The model the dataset was ingested with (same preset, side and init seed: same VQ codes)."""
    from janus_lab.model.weights import build_bundle
    from janus_lab.train.config import ModelConfig

    spec = manifest.model
    config = ModelConfig(preset=spec["preset"], weights=spec.get("weights"), image_size=int(spec["image_size"]))
    return build_bundle(config, init_seed=spec.get("init_seed") or 0)


def shard_bytes(uri: str, manifest) -> dict[str, int]:
    """Bytes of the dataset's shard objects: in all, and per top-level column (compressed chunks)."""
    import pyarrow.parquet as pq

    from janus_lab.storage import pyarrow_filesystem

    fs, root = pyarrow_filesystem(uri)
    sizes = {"total": 0}
    for name in manifest.shards:
        path = f"{root.rstrip('/')}/{name}"
        sizes["total"] += fs.get_file_info(path).size
        with fs.open_input_file(path) as handle:
            metadata = pq.ParquetFile(handle).metadata
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                top = chunk.path_in_schema.split(".")[0]
                sizes[top] = sizes.get(top, 0) + chunk.total_compressed_size
    return sizes


def extract_source(source: Path, into: Path) -> Path:
    """The published script reads an unpacked folder: untar the `*_part_N.tar` files (not timed)."""
    tars = sorted(source.glob("*.tar"))
    if not tars:
        return source
    into.mkdir(parents=True, exist_ok=True)
    for part in tars:
        with tarfile.open(part) as archive:
            archive.extractall(into, filter="data")
    for name in SHAREGPT_FILES:
        if (source / name).exists():
            (into / name).write_bytes((source / name).read_bytes())
    return into


def naive_items(folder: Path) -> list[dict]:
    """The records as the published script's `SftDataset` holds them (JSON items, image paths)."""
    items = []
    for name in SHAREGPT_FILES:
        path = folder / name
        if path.exists():
            for item in json.loads(path.read_text()):
                task = "ti2i" if item.get("input_image") else "t2i"
                items.append({**item, "task": task, "id": item["output_image"]})
    if not items:
        raise FileNotFoundError(f"{folder} has neither {' nor '.join(SHAREGPT_FILES)}")
    return items


def raw_image_bytes(folder: Path, items: list[dict]) -> int:
    return sum((folder / path).stat().st_size
               for item in items for path in (item["output_image"], *item.get("input_image", [])))


# --------------------------------------------------------------------------- the two paths


class Consumer:
    """Stands in for the training step: takes each batch and counts what it holds."""

    def __init__(self):
        self.samples = self.tokens = 0

    def __call__(self, batch: dict) -> None:
        self.samples += int(batch["input_ids"].shape[0])
        self.tokens += int(batch["attention_mask"].sum())


class TimedIterator:
    """Wraps an iterator; adds up the time spent waiting on it and notes when the first item came."""

    def __init__(self, items: Iterable, started: float):
        self.items = iter(items)
        self.started = started
        self.waited = 0.0
        self.first: float | None = None

    def __iter__(self) -> Iterator:
        while True:
            began = time.perf_counter()
            try:
                item = next(self.items)
            except StopIteration:
                self.waited += time.perf_counter() - began
                return
            now = time.perf_counter()
            self.waited += now - began
            if self.first is None:
                self.first = now - self.started
            yield item


def run_stream(uri: str, bundle, args: argparse.Namespace) -> dict:
    """Ours: the epoch's row groups from S3 -> `micro_batches` -> consumer, for `args.epochs` epochs."""
    from janus_lab.data.stream import StreamSpec, epoch_part, micro_batches, read_part, scan_layout
    from janus_lab.model import SequenceBuilder

    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens)
    consumer = Consumer()
    total = startup = waited = 0.0
    scanned = time.perf_counter()
    layout = scan_layout(uri)
    log(f"layout: {len(layout.row_groups)} row groups scanned in {time.perf_counter() - scanned:.2f} s (once a run)")
    per_epoch = []
    for epoch in range(args.epochs):
        spec = StreamSpec(epoch=epoch, rank=0, world_size=1, micro_batch_size=args.micro_batch,
                          masking_seed=args.seed, t2i_text_drop=0.1, ti2i_image_drop=0.5)
        before = consumer.samples
        started = time.perf_counter()
        part = epoch_part(layout, args.seed, epoch, rank=0, world_size=1)
        rows = TimedIterator(read_part(layout, part, args.seed, epoch, spec.shuffle_window_rows), started)
        for batch in micro_batches(rows, builder, spec):
            consumer(batch)
        seconds = time.perf_counter() - started
        first = rows.first if rows.first is not None else seconds
        total, startup, waited = total + seconds, startup + first, waited + rows.waited
        done = consumer.samples - before
        per_epoch.append((done, seconds))
        log(f"stream epoch {epoch + 1}/{args.epochs}: {done} samples in {seconds:.2f} s ({done / seconds:.1f}/s); "
            f"first row after {first:.2f} s, {rows.waited:.2f} s waiting on reads in all")
    return {"samples": consumer.samples, "tokens": consumer.tokens, "seconds": total, "startup": startup,
            "read_wait": waited, "per_epoch": per_epoch}


def run_naive(folder: Path, items: list[dict], bundle, args: argparse.Namespace) -> dict:
    """The published script's path: PNG -> RGB -> resize -> VQ-encode -> tokenise -> collate, per sample."""
    import torch
    from PIL import Image

    from janus_lab.model import SequenceBuilder, collate_samples, draw_mask_decision, encode_vq_codes, image_to_tensor

    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens)
    order = random.Random(args.seed).sample(items, len(items))
    count = min(args.naive_samples, len(order)) // args.micro_batch * args.micro_batch
    consumer = Consumer()
    timings = {"decode": 0.0, "vq": 0.0, "tokenise": 0.0}

    def load(path: str) -> torch.Tensor:
        with Image.open(folder / path) as image:
            return image_to_tensor(image, bundle.image_size)

    started = last_log = time.perf_counter()
    pending: list = []
    for index, item in enumerate(order[:count]):
        t0 = time.perf_counter()
        output = load(item["output_image"])
        inputs = [load(path) for path in item.get("input_image", [])]
        t1 = time.perf_counter()
        codes = encode_vq_codes(bundle.model, torch.stack([output, *inputs])).tolist()
        t2 = time.perf_counter()
        mask = draw_mask_decision(item["id"], 0, args.seed, item["task"], len(inputs), 0.1, 0.5)
        sample = builder.training_sample(item["input_prompt"], codes[0], codes[1:], mask)
        pending.append((sample, inputs))
        if len(pending) == args.micro_batch:
            samples = [s for s, _ in pending]
            consumer(collate_samples(samples, builder.special.pad, [p for _, pixels in pending for p in pixels]))
            pending = []
        t3 = time.perf_counter()
        for key, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2)):
            timings[key] += seconds
        if time.perf_counter() - last_log > 10 or index + 1 == count:
            elapsed = time.perf_counter() - started
            log(f"naive: {index + 1}/{count} samples in {elapsed:.1f} s ({(index + 1) / elapsed:.2f}/s)")
            last_log = time.perf_counter()
    return {"samples": consumer.samples, "tokens": consumer.tokens, "seconds": time.perf_counter() - started,
            **timings}


# --------------------------------------------------------------------------- report


def report(stream: dict, naive: dict, stored: dict, raw: float, side: int, args: argparse.Namespace) -> None:
    naive_rate = naive["samples"] / naive["seconds"]
    print()
    print(f"data path: debug VQ tokenizer, {side} px, micro-batch {args.micro_batch}, {args.epochs} epochs streamed, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'path':44s} {'samples':>8s} {'seconds':>9s} {'samples/s':>10s}")
    warm = stream["per_epoch"][1:]
    rows = [("stream from S3, end to end, all epochs", stream["samples"], stream["seconds"])]
    if warm:  # the first epoch also pays first-use costs (S3 connections, lazy imports)
        rows.append(("stream from S3, end to end, epochs 2+", sum(n for n, _ in warm), sum(t for _, t in warm)))
    # Rows of a small epoch arrive in one burst: this row is the consumer-side cost of rows in hand.
    rows.append(("stream from S3, after each epoch's first row", stream["samples"],
                 stream["seconds"] - stream["startup"]))
    for name, samples, seconds in rows:
        print(f"{name:44s} {samples:8d} {seconds:9.2f} {samples / seconds:10.2f}")
    print(f"{'naive: PNG + VQ encode every step':44s} {naive['samples']:8d} {naive['seconds']:9.2f} "
          f"{naive_rate:10.2f}")
    for name, samples, seconds in rows:
        ratio = samples / seconds / naive_rate
        print(f"{'ours / baseline, ' + name.split(', ', 1)[1]:44s} {'':8s} {'':9s} {ratio:9.1f}x")
    print()
    print(f"stream time: {stream['startup']:.2f} s until the first row of each epoch (first window read), "
          f"{stream['read_wait']:.2f} s waiting on reads in all, "
          f"{stream['seconds'] - stream['read_wait']:.2f} s tokenising, decoding input PNGs, collating")
    print(f"naive time: {naive['decode']:.2f} s PNG open + RGB + resize, {naive['vq']:.2f} s VQ encode, "
          f"{naive['tokenise']:.2f} s tokenise + collate")
    total = stored["total"]
    parts = ", ".join(f"{name} {stored.get(name, 0):,.0f}" for name in ("output_codes", "input_codes", "input_pixels"))
    print(f"bytes per sample: shards {total:,.0f} ({parts}, the rest text and Parquet metadata); "
          f"raw source images {raw:,.0f}; stored / raw {total / raw:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log(f"load average {os.getloadavg()[0]:.1f}")
    import ray

    from janus_lab.data.schema import DatasetManifest

    stack = None
    with tempfile.TemporaryDirectory(prefix="janus-bench-data-") as tmp:
        work = Path(tmp)
        try:
            if args.dataset_uri is None:
                log("starting a throwaway S3 (SeaweedFS) on free ports")
                stack = start_s3(work / "stack")
            start_ray()
            if args.dataset_uri is None:
                uri, source = write_and_ingest(work, stack.bucket, args)
            else:
                uri = args.dataset_uri
            manifest = DatasetManifest.read(uri)
            if args.dataset_uri is not None:
                given = args.source_dir or manifest.source["path"]
                if str(given).startswith("s3://"):
                    raise SystemExit(f"the naive path reads a local folder; {given} is in S3: pass --source-dir")
                source = Path(given)
            bundle = model_for(manifest)
            folder = extract_source(source, work / "extracted")
            items = naive_items(folder)
            stored = {k: v / manifest.rows for k, v in shard_bytes(uri, manifest).items()}
            raw = raw_image_bytes(folder, items) / len(items)
            log(f"{manifest.rows} rows in {len(manifest.shards)} shards; streaming {args.epochs} epochs")
            stream = run_stream(uri, bundle, args)
            log(f"naive path over {min(args.naive_samples, len(items))} samples")
            naive = run_naive(folder, items, bundle, args)
            report(stream, naive, stored, raw, bundle.image_size, args)
        finally:
            ray.shutdown()
            if stack is not None:
                stack.down(timeout_s=3.0)  # throwaway data: no need to wait out SeaweedFS's drain


if __name__ == "__main__":
    main()
