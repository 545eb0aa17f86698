"""Ingest: a raw dataset -> VQ-coded Parquet shards, `_rejects.parquet` and `_manifest.json`.

    driver    read the records (a source unusable as a whole fails here, naming the file)
              list the archives (a Ray Data map, one task per archive)
              check the records: structure, prompt, ids, image paths (`sources.check_records`)
    Ray Data  read tasks     -> images read, verified, RGB, letterboxed (`prepare_records`)
              encoder actors -> prompt length checked, images VQ-encoded (`VQEncoder`, model loaded once)
              writer tasks   -> one zstd shard each under `_tmp-<run>/` (`write_shard`)
    driver    shards moved into place as `part-NNNNN.parquet`, `_rejects.parquet`, `_manifest.json` last

A bad record travels as a row with a `reason` and ends in `_rejects.parquet`; it never stops the
others. A reader only trusts a folder with a manifest, and the manifest is written last, so an
ingest killed at any point leaves nothing that looks finished; the next run cleans up and redoes it.
Every write to the output is retried through an S3 outage (`retry` in the config,
`janus_lab.retry`); each retried step rewrites whole objects, so a retry never leaves half a shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from janus_lab.cluster import connect_ray, in_submitted_job
from janus_lab.data.config import IngestConfig, IngestOutputConfig
from janus_lab.data.images import ImageRejected, decode_png_pixels, encode_png, prepare_image
from janus_lab.data.order import order_key
from janus_lab.data.schema import (
    EMPTY_PROMPT,
    IMAGE_TOO_LARGE,
    MANIFEST_NAME,
    PROMPT_TOO_LONG,
    REJECTS_NAME,
    REJECTS_SCHEMA,
    SHARD_PREFIX,
    SHARD_SCHEMA,
    SPLITS,
    UNREADABLE_IMAGE,
    DatasetManifest,
    Reject,
    assign_splits,
    empty_counts,
    shard_name,
)
from janus_lab.data.sources import (
    ImageLocation,
    ImageReader,
    LocatedRecord,
    SourceError,
    archive_members,
    build_image_index,
    check_records,
    group_by_archive_stream,
    is_archive,
    list_source_files,
    read_records,
)
from janus_lab.patches import num_image_tokens
from janus_lab.retry import S3RetryConfig
from janus_lab.retry import with_s3_retries
from janus_lab.storage import is_s3_uri, pyarrow_filesystem
from janus_lab.train.config import ModelConfig

log = logging.getLogger(__name__)

STAGING_PREFIX = "_tmp-"
# Everything an ingest ever writes into its output folder; anything else there is not ours.
OUTPUT_PATTERNS = (f"{SHARD_PREFIX}*.parquet", REJECTS_NAME, MANIFEST_NAME, f"{MANIFEST_NAME}.*.tmp",
                   f"{STAGING_PREFIX}*")
# Each per-record limit (an `IngestLimitsConfig` field) and the reject category it causes; the
# manifest and the job's log say how many records each one dropped.
LIMIT_CATEGORIES = {"max_text_tokens": PROMPT_TOO_LONG, "max_image_pixels": IMAGE_TOO_LARGE}

# Between stages a row keeps where it came from and, once rejected, why; a rejected row's other
# columns are null.
_TRACE = [pa.field("source_file", pa.string()), pa.field("record_index", pa.int64()), pa.field("reason", pa.string())]
# Read tasks -> encoder actors: the record, and its images as PNGs at the model's side.
PREPARED_SCHEMA = pa.schema([
    *(f.with_nullable(True) for f in SHARD_SCHEMA if f.name in ("id", "task", "prompt", "source", "split")),
    *_TRACE,
    pa.field("output_png", pa.binary()),
    pa.field("input_pngs", pa.list_(pa.binary())),
])
# Encoder actors -> writer tasks: a shard row, and the fingerprint of the model that encoded it.
ENCODED_SCHEMA = pa.schema([
    *(f.with_nullable(True) for f in SHARD_SCHEMA),
    *_TRACE,
    pa.field("fingerprint", pa.string()),
])
# Writer tasks -> driver: one row per batch.
SUMMARY_SCHEMA = pa.schema([
    pa.field("shard", pa.string()),  # staging file name; null when every row of the batch was rejected
    pa.field("first_record", pa.string()),  # orders shards, so their final names follow the source
    pa.field("records", pa.int64()),
    pa.field("counts", pa.string()),  # JSON {task: {split: n}}
    pa.field("rejects", pa.string()),  # JSON list of Reject fields
    pa.field("fingerprints", pa.list_(pa.string())),
    pa.field("retries", pa.int64()),  # tries of the shard write that met an S3 outage
])


class IngestError(RuntimeError):
    """An ingest that cannot produce a dataset (nothing usable, or inconsistent encoders)."""


class OutputExistsError(FileExistsError):
    """The output folder holds a finished dataset, or files that an ingest did not write."""


@dataclass
class IngestResult:
    """What an ingest produced."""

    uri: str
    manifest: DatasetManifest
    rejects: list[Reject]
    seconds: float
    s3_retries: int = 0
    """Storage steps retried because S3 did not answer (writers and driver together)."""

    def summary(self) -> str:
        """A few lines for the job's log: rows per task and split, rejects per category."""
        m = self.manifest
        lines = [f"ingested {m.rows} rows into {len(m.shards)} shards at {self.uri} in {self.seconds:.1f} s"]
        for task, per_split in m.counts.items():
            lines.append(f"  {task:5s} " + "  ".join(f"{split} {n}" for split, n in per_split.items()))
        where = f" (see {self.uri.rstrip('/')}/{REJECTS_NAME})" if m.rejects else ""
        lines.append(f"rejected {m.rejects} records{where}")
        for category, n in sorted(Counter(r.category for r in self.rejects).items()):
            lines.append(f"  {category}: {n}")
        lines.append("dropped by limits: " + ", ".join(f"{limit['rejected']} over {name}={limit['limit']}"
                                                       for name, limit in m.limits.items()))
        held = sum(per_split["val"] for per_split in m.counts.values())
        rule = f"val_count={m.val_count}" if m.val_count is not None else f"val_fraction={m.val_fraction}"
        lines.append(f"held out for validation: {held} rows ({rule})")
        if self.s3_retries:
            lines.append(f"S3 outages: {self.s3_retries} storage steps retried (nothing partial kept)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- output folder


def _is_ours(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_PATTERNS)


def prepare_output(uri: str, overwrite: bool) -> None:
    """Makes the output folder ready for a new ingest.

    An empty or missing folder is used as is. A finished dataset (one with a manifest) is
    replaced only with `overwrite`; its manifest goes first, so a failure halfway leaves an
    unfinished folder rather than a manifest over missing shards. A folder an interrupted ingest
    left behind (no manifest) is cleaned. Files that an ingest does not write are never deleted.

    Raises:
        OutputExistsError: a finished dataset without `overwrite`, or files that are not ours.
    """
    fs, root = pyarrow_filesystem(uri)
    root = root.rstrip("/")
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    if not entries:
        return
    names = {posixpath.basename(e.path.rstrip("/")): e for e in entries}
    if MANIFEST_NAME in names and not overwrite:
        raise OutputExistsError(f"{uri} already holds an ingested dataset ({MANIFEST_NAME} is there); "
                                "set output.overwrite=true to replace it, or choose another output.uri")
    foreign = sorted(name for name in names if not _is_ours(name))
    if foreign:
        raise OutputExistsError(f"{uri} holds files an ingest did not write ({', '.join(foreign[:5])}); "
                                "choose an empty or new output.uri")
    if MANIFEST_NAME in names:
        log.info("replacing the dataset at %s (output.overwrite=true)", uri)
        fs.delete_file(names.pop(MANIFEST_NAME).path)
    else:
        log.info("cleaning up an unfinished ingest at %s", uri)
    for entry in names.values():
        if entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)
        else:
            fs.delete_file(entry.path)


# --------------------------------------------------------------------------- read tasks


def _work_record(located: LocatedRecord, fmt: str, split: str) -> dict:
    """A checked record as the JSON-able dict the read tasks receive."""
    r = located.record
    images = [{"path": path, **dataclasses.asdict(loc)}
              for path, loc in zip((located.output_path, *located.input_paths), (located.output, *located.inputs))]
    return {"id": r.id, "task": r.task, "prompt": r.prompt, "source": f"{fmt}:{r.source_file}", "split": split,
            "source_file": r.source_file, "record_index": r.record_index, "images": images}


def _prepared_row(record: dict, reason: str | None = None, pngs: list[bytes] | None = None) -> dict:
    row = {k: record[k] for k in ("id", "task", "prompt", "source", "split", "source_file", "record_index")}
    row.update(reason=reason, output_png=pngs[0] if pngs else None, input_pngs=pngs[1:] if pngs else [])
    return row


class _PreparedImages:
    """PNGs (or reasons) of prepared images, each prepared once however many records use it."""

    def __init__(self, max_pixels: int, side: int):
        self.max_pixels, self.side = max_pixels, side
        self.results: dict[tuple, bytes | str] = {}

    def add(self, key: tuple, path: str, data: bytes | None = None, error: str | None = None) -> None:
        if error is not None:
            self.results[key] = f"{UNREADABLE_IMAGE}: {path} ({error})"
            return
        try:
            # Level 1: these PNGs are small and stored once; speed matters more than bytes here.
            self.results[key] = encode_png(prepare_image(data, self.max_pixels, self.side), compress_level=1)
        except ImageRejected as err:
            self.results[key] = f"{err.category}: {path} ({err.detail})"

    def row(self, record: dict) -> dict:
        results = [self.results[_key(image)] for image in record["images"]]
        reason = next((r for r in results if isinstance(r, str)), None)
        return _prepared_row(record, reason=reason) if reason else _prepared_row(record, pngs=results)


def _key(image: dict) -> tuple:
    return (image["file"], image["member"])


def _location(image: dict) -> ImageLocation:
    return ImageLocation(image["file"], image["member"], image["offset"], image["size"])


def prepare_records(batch: pa.Table, source_uri: str, max_pixels: int, side: int,
                    chunk_rows: int = 16) -> Iterator[pa.Table]:
    """Read task: each row of `batch` is a work item (a JSON list of checked records).

    Images in plain files and `.tar` parts are read in place; a work item whose records need a
    compressed archive streams it once, preparing wanted members as they pass by.

    Yields:
        `PREPARED_SCHEMA` tables of about `chunk_rows` rows.
    """
    rows: list[dict] = []
    for text in batch.column("records").to_pylist():
        for row in _prepare_item(json.loads(text), source_uri, max_pixels, side):
            rows.append(row)
            if len(rows) >= chunk_rows:
                yield pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def _prepare_item(records: list[dict], source_uri: str, max_pixels: int, side: int) -> Iterator[dict]:
    prepared = _PreparedImages(max_pixels, side)
    with ImageReader(source_uri) as reader:

        def emit(record: dict) -> dict:
            for image in record["images"]:
                key = _key(image)
                if key not in prepared.results:  # a plain file or `.tar` member: read in place
                    try:
                        prepared.add(key, image["path"], reader.read(_location(image)))
                    except OSError as err:
                        prepared.add(key, image["path"], error=str(err))
            return prepared.row(record)

        streamed = [{_key(image) for image in r["images"] if _location(image).streamed} for r in records]
        waiting = {i: set(keys) for i, keys in enumerate(streamed) if keys}
        for i, keys in enumerate(streamed):
            if not keys:
                yield emit(records[i])
        # The rest wait until every compressed-archive member they need has streamed past; then
        # they are emitted and PNGs no other record waits for are dropped, so memory holds only
        # the images of pending records.
        users = Counter(key for keys in streamed for key in keys)

        def arrived(key: tuple) -> Iterator[dict]:
            for i in [i for i, keys in waiting.items() if key in keys]:
                waiting[i].discard(key)
                if not waiting[i]:
                    del waiting[i]
                    yield emit(records[i])
                    for done in streamed[i]:
                        users[done] -= 1
                        if users[done] == 0:
                            del prepared.results[done]

        for archive in sorted({key[0] for keys in waiting.values() for key in keys}):
            wanted = {image["member"]: image["path"] for r in records for image in r["images"]
                      if image["file"] == archive}
            failure = None
            try:
                for member, data in reader.stream_members(archive, set(wanted)):
                    if member not in wanted:
                        continue  # a second copy of a member: the first one counts
                    prepared.add((archive, member), wanted.pop(member), data)
                    yield from arrived((archive, member))
            except Exception as err:  # a corrupt archive fails only the records still waiting on it
                failure = f"archive {posixpath.basename(archive)}: {err}"
            name = posixpath.basename(archive)
            for member, path in wanted.items():  # listed before, yet not met: truncated or changed since
                prepared.add((archive, member), path, error=failure or f"archive {name} ended before it")
                yield from arrived((archive, member))


# --------------------------------------------------------------------------- encoder actors


def _encoding_model_config(model: ModelConfig) -> ModelConfig:
    """The model to build for its VQ tokenizer: `model`, or for the miniature without weights `mini-init`.

    The shipped mini VQ tokenizer is the same with or without the base language model, and
    encoding needs only the tokenizer: ingest works before the base model exists.
    """
    if model.preset == "mini" and not model.weights:
        return dataclasses.replace(model, preset="mini-init")
    return model


CODE_MAKING_PARTS = ("encoder.", "quant_conv.", "quantize.")
"""The VQ tokenizer's parts that turn pixels into codes; the decoder (codes -> pixels) is not one."""


def vq_fingerprint(model, tokenizer) -> str:
    """sha256 over the weights (as float32) of the VQ tokenizer's code-making parts (encoder,
    quant_conv, codebook) and the text tokenizer's vocabulary.

    `model` is a Janus model or its VQ tokenizer alone.

    Two models give the same codes and prompt ids exactly when their fingerprints match, so a
    fine-tune can check that shards were made by its own tokenizers. The decoder is left out:
    a better decoder for the same codes (a sharper picture from the same tokens) leaves every
    dataset and every model trained on them valid.
    """
    import torch

    from transformers import JanusVQVAE

    vq = model if isinstance(model, JanusVQVAE) else model.model.vqmodel
    digest = hashlib.sha256()
    for name, tensor in sorted(vq.state_dict().items()):
        if not name.startswith(CODE_MAKING_PARTS):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()


class VQEncoder:
    """Ray Data actor: holds the model once, checks prompt lengths and VQ-encodes every image.

    Args:
        model: `ModelConfig` fields.
        init_seed: seed of a random-init preset.
        max_text_tokens: longest accepted prompt.
    """

    def __init__(self, model: dict, init_seed: int, max_text_tokens: int):
        # The model is imported here, in the actor: the driver never needs it.
        import torch

        from janus_lab.model.sequence import SequenceBuilder
        from janus_lab.model.weights import build_bundle, load_vq_tokenizer

        config = ModelConfig(**model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Only the VQ tokenizer (0.07 B parameters) is held: the rest of a 7B model would take
        # ~30 GB of host memory in every actor for nothing. With weights, only its tensors are
        # read; a random-init preset is built whole (the seed fixes the VQ weights only through
        # the full build, as fine-tuning does it) and the rest dropped.
        if config.weights:
            vq, processor, janus = load_vq_tokenizer(config.weights)
            image_size = int(janus.vision_config.image_size)
        else:
            bundle = build_bundle(_encoding_model_config(config), init_seed)
            vq, processor, image_size = bundle.model.model.vqmodel, bundle.processor, bundle.image_size
            del bundle
        if image_size != config.image_size:
            raise ValueError(f"model.image_size is {config.image_size} but the model reads {image_size} px images")
        codebook = vq.quantize.embedding.weight.shape[0]
        if codebook > 2**15:
            raise ValueError(f"a codebook of {codebook} codes does not fit the int16 codes of the shard schema")
        self.fingerprint = vq_fingerprint(vq, processor.tokenizer)
        self.builder = SequenceBuilder(processor.tokenizer, num_image_tokens(image_size), max_text_tokens)
        self.vq = vq.to(device=self.device, dtype=torch.float32).eval()

    def _prompt_problem(self, prompt: str) -> str | None:
        from janus_lab.model.sequence import PromptTooLongError

        try:
            self.builder.prompt_tokens(prompt)
        except PromptTooLongError as err:
            return f"{PROMPT_TOO_LONG}: {err}"
        except ValueError as err:
            return f"{EMPTY_PROMPT}: {err}"
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from janus_lab.model.vq import encode_vq_codes, pixels_to_tensor

        rows = batch.to_pylist()
        for row in rows:
            if row["reason"] is None:
                row["reason"] = self._prompt_problem(row["prompt"])
        good = [row for row in rows if row["reason"] is None]
        images = [png for row in good for png in (row["output_png"], *row["input_pngs"])]
        codes = []
        if images:
            pixels = pixels_to_tensor(np.stack([decode_png_pixels(png) for png in images]))
            codes = encode_vq_codes(self.vq, pixels).cpu().numpy().astype(np.int16).tolist()
        out, position = [], 0
        for row in rows:
            entry = {name: row.get(name) for name in ("id", "task", "prompt", "source", "split", "source_file",
                                                      "record_index", "reason")}
            entry.update(output_codes=None, input_codes=None, input_pixels=None, fingerprint=self.fingerprint)
            if row["reason"] is None:
                k = len(row["input_pngs"])
                entry.update(output_codes=codes[position], input_codes=codes[position + 1:position + 1 + k],
                             input_pixels=[_recompress(png) for png in row["input_pngs"]])
                position += 1 + k
            out.append(entry)
        return pa.Table.from_pylist(out, schema=ENCODED_SCHEMA)


def _recompress(png: bytes) -> bytes:
    # Stored input images are kept at full PNG compression: they are read on every epoch.
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return encode_png(image)


# --------------------------------------------------------------------------- writer tasks


def write_shard(batch: pa.Table, staging_uri: str,
                rows_per_row_group: int = IngestOutputConfig.rows_per_row_group,
                retry: S3RetryConfig | None = None) -> pa.Table:
    """Writer task: the good rows of `batch` become one zstd shard in the staging folder.

    The shard's row groups hold at most `rows_per_row_group` rows of one split each: a row group
    is what a training worker fetches, so small ones let each worker read only its own part of
    an epoch, and validation reads only validation rows.

    Through an S3 outage the whole shard is written again (`retry`): its staging name is
    listed nowhere until this task returns, so a failed try is never taken for a shard.

    Returns:
        One `SUMMARY_SCHEMA` row: the shard's name, its counts, the batch's rejects.
    """
    good = batch.filter(pc.is_null(batch["reason"]))
    bad = batch.filter(pc.is_valid(batch["reason"]))
    counts = empty_counts()
    for task, split in zip(good["task"].to_pylist(), good["split"].to_pylist()):
        counts[task][split] += 1
    name, first = None, None
    retries = [0]
    if good.num_rows:
        keys = sorted(zip(good["source_file"].to_pylist(), good["record_index"].to_pylist()))
        first = f"{keys[0][0]}\x00{keys[0][1]:012d}"
        name = f"{uuid.uuid4().hex}.parquet"
        fs, root = pyarrow_filesystem(staging_uri)
        table = good.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        path = f"{root.rstrip('/')}/{name}"
        with_s3_retries(lambda: _write_shard_file(table, path, fs, rows_per_row_group), "writing shard",
                        f"{staging_uri.rstrip('/')}/{name}", retry, on_retry=lambda: retries.__setitem__(0, retries[0] + 1))
    rejects = bad.select(REJECTS_SCHEMA.names).to_pylist()
    return pa.Table.from_pylist([{
        "shard": name, "first_record": first, "records": batch.num_rows, "counts": json.dumps(counts),
        "rejects": json.dumps(rejects), "fingerprints": sorted(set(good["fingerprint"].to_pylist())),
        "retries": retries[0],
    }], schema=SUMMARY_SCHEMA)


def _write_shard_file(table: pa.Table, path: str, fs, rows_per_row_group: int) -> None:
    # Statistics only for `split`, which readers prune row groups by: in small row groups the
    # min/max of prompts and PNGs would add a tenth or more to the file.
    with pq.ParquetWriter(path, SHARD_SCHEMA, filesystem=fs, compression="zstd",
                          write_statistics=["split"]) as writer:
        for split in SPLITS:
            rows = table.filter(pc.equal(table["split"], split))
            if rows.num_rows:
                writer.write_table(rows, row_group_size=rows_per_row_group)


def _list_archive(row: dict, source_uri: str) -> dict:
    try:
        members = archive_members(source_uri, row["archive"])
        return {"archive": row["archive"], "members": json.dumps(members), "error": None}
    except SourceError as err:
        return {"archive": row["archive"], "members": "[]", "error": str(err)}


# --------------------------------------------------------------------------- driver


def _check_local_paths(cfg: IngestConfig) -> None:
    # A submitted job runs in a temporary copy of the working dir, without git-ignored folders
    # such as data/: a relative source is not there, and a relative output would be lost.
    if not in_submitted_job():
        return
    for key, path in (("source.path", cfg.source.path), ("output.uri", cfg.output.uri)):
        if not is_s3_uri(path) and not os.path.isabs(path):
            raise IngestError(f"{key}={path!r} is relative, but a submitted Ray job runs in a temporary copy of "
                              "the working dir; use an s3:// URI (or an absolute path on a one-machine cluster)")


def _absolute(uri: str) -> str:
    return uri.rstrip("/") if is_s3_uri(uri) else os.path.abspath(uri)


def _has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _index_images(source_uri: str, files: list[str]):
    import ray.data

    archives = [name for name in files if is_archive(name)]
    members = {}
    if archives:
        listed = (ray.data.from_items([{"archive": a} for a in archives], override_num_blocks=len(archives))
                  .map(_list_archive, fn_kwargs={"source_uri": source_uri})
                  .take_all())
        errors = sorted(row["error"] for row in listed if row["error"])
        if errors:
            raise SourceError("; ".join(errors))
        members = {row["archive"]: json.loads(row["members"]) for row in listed}
    return build_image_index(source_uri, files, members)


def run_ingest(cfg: IngestConfig) -> IngestResult:
    """Runs an ingest end to end on the connected Ray cluster (or a local one).

    Raises:
        SourceError: the source is unusable as a whole.
        OutputExistsError: see `prepare_output`.
        IngestError: every record was rejected, or the encoders disagree.
    """
    started = time.monotonic()
    _check_local_paths(cfg)
    # Workers do not share the driver's working directory: they get absolute paths.
    source_uri, output_uri = _absolute(cfg.source.path), _absolute(cfg.output.uri)
    files = list_source_files(source_uri)
    records = read_records(cfg.source.format, source_uri, files)
    retried = _Retried(cfg.retry)
    retried(lambda: prepare_output(output_uri, cfg.output.overwrite), "preparing the output", output_uri)
    connect_ray()
    with _record_progress_only():
        index = _index_images(source_uri, files)
        accepted, rejects = check_records(records, index)
        log.info("%d records in %s; %d rejected before reading any image", len(records), source_uri, len(rejects))
        staging_uri = f"{output_uri}/{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        fs, staging_root = pyarrow_filesystem(staging_uri)
        retried(lambda: fs.create_dir(staging_root, recursive=True), "creating", staging_uri)
        summaries = _encode_and_write(cfg, source_uri, staging_uri, accepted, len(records), len(rejects))
    return _finish(cfg, output_uri, staging_uri, summaries, rejects, started, retried)


class _Retried:
    """The driver's storage steps, each retried through an S3 outage (`cfg.retry`) and counted."""

    def __init__(self, policy: S3RetryConfig):
        self.policy, self.retries = policy, 0

    def __call__(self, call, what: str, uri: str):
        return with_s3_retries(call, what, uri, self.policy, on_retry=self._count)

    def _count(self) -> None:
        self.retries += 1


def _move_once(fs, source: str, target: str):
    """`fs.move` that may be tried again: a try whose answer was lost may have moved it already."""
    tried = []

    def move() -> None:
        if tried and fs.get_file_info(source).type == pafs.FileType.NotFound \
                and fs.get_file_info(target).type == pafs.FileType.File:
            return
        tried.append(True)
        fs.move(source, target)

    return move


def _delete_dir_once(fs, path: str):
    def delete() -> None:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    return delete


@contextlib.contextmanager
def _record_progress_only() -> Iterator[None]:
    # Our bar counts records; Ray Data's count blocks per operator and, without a terminal, log
    # a status block every few seconds. A Dataset copies the context when it is created.
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = saved


def _work_items(accepted: list[LocatedRecord], records_per_task: int) -> list[list[LocatedRecord]]:
    """The read tasks' work, in the order their rows reach the writers.

    Records go in a fixed hash order of their ids, not source order, so every shard mixes the
    tasks and source files (rather than holding one file's records after another's) and any
    stretch of row groups a training worker reads is a mix too. Records that need the same
    compressed archives stay one item, read in one pass over them; such an item takes its
    place in the order by its first record.
    """
    def key(located: LocatedRecord) -> int:
        return order_key(0, 0, f"write:{located.record.id}")

    direct, streamed = group_by_archive_stream(accepted)
    items = _chunks(sorted(direct, key=key), records_per_task) + list(streamed.values())
    return sorted(items, key=lambda item: key(item[0]))


def _encode_and_write(cfg: IngestConfig, source_uri: str, staging_uri: str, accepted: list[LocatedRecord],
                      total: int, done: int) -> list[dict]:
    """The Ray Data part: read tasks -> encoder actors -> writer tasks; returns the writers' summaries."""
    import ray.data
    from tqdm import tqdm

    items = _work_items(accepted, cfg.ray.records_per_task)
    if not items:
        return []
    # By count, the split needs every id at once; records rejected later (unreadable images,
    # long prompts) are not replaced, so `val` may end a little under `val_count`.
    splits = dict(zip((r.record.id for r in accepted),
                      assign_splits([r.record.id for r in accepted], cfg.split.seed, cfg.split.fraction,
                                    cfg.split.val_count)))
    work = [{"records": json.dumps([_work_record(r, cfg.source.format, splits[r.record.id]) for r in item])}
            for item in items]
    # On a CPU cluster Ray Data fuses the read tasks into the encoder actors (same resources);
    # with GPUs the reads stay CPU tasks feeding the GPU actors. The encoder takes the read
    # tasks' tables as they come (`batch_size` records each): a row count there would make Ray
    # Data bundle that many *work items* into one task, all on one actor, the others idle.
    encoder_resources = {"num_gpus": 1} if _has_gpus() else {"num_cpus": 1}
    ds = (ray.data.from_items(work, override_num_blocks=len(work))
          .map_batches(prepare_records, batch_size=1, batch_format="pyarrow",
                       fn_kwargs={"source_uri": source_uri, "max_pixels": cfg.limits.max_image_pixels,
                                  "side": cfg.model.image_size, "chunk_rows": cfg.ray.batch_size})
          .map_batches(VQEncoder, batch_size=None, batch_format="pyarrow",
                       compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_encoder_actors), **encoder_resources,
                       fn_constructor_kwargs={"model": dataclasses.asdict(cfg.model), "init_seed": cfg.init_seed,
                                              "max_text_tokens": cfg.limits.max_text_tokens})
          .map_batches(write_shard, batch_size=cfg.output.rows_per_shard, batch_format="pyarrow",
                       fn_kwargs={"staging_uri": staging_uri, "retry": cfg.retry,
                                  "rows_per_row_group": cfg.output.rows_per_row_group}))
    summaries = []
    with tqdm(total=total, initial=done, unit="record", desc="ingest") as bar:
        for summary in ds.iter_rows():
            summaries.append(summary)
            bar.update(summary["records"])
    return summaries


def _finish(cfg: IngestConfig, output_uri: str, staging_uri: str, summaries: list[dict],
            rejects: list[Reject], started: float, retried: _Retried | None = None) -> IngestResult:
    """Moves shards into place, writes the rejects, then the manifest (last).

    Each step is retried through an S3 outage; until the manifest's single PUT lands, the
    folder is an unfinished ingest to every reader (`DatasetManifest.read`).
    """
    retried = retried or _Retried(cfg.retry)
    fs, root = pyarrow_filesystem(output_uri)
    _, staging_root = pyarrow_filesystem(staging_uri)
    root, staging_root = root.rstrip("/"), staging_root.rstrip("/")
    counts = empty_counts()
    fingerprints = set()
    for summary in summaries:
        rejects.extend(Reject(**r) for r in json.loads(summary["rejects"]))
        fingerprints.update(summary["fingerprints"])
        for task, per_split in json.loads(summary["counts"]).items():
            for split, n in per_split.items():
                counts[task][split] += n
    rejects.sort(key=lambda r: (r.source_file, r.record_index))
    rejects_table = pa.Table.from_pylist([dataclasses.asdict(r) for r in rejects], schema=REJECTS_SCHEMA)
    retried(lambda: pq.write_table(rejects_table, f"{staging_root}/{REJECTS_NAME}", filesystem=fs,
                                   compression="zstd"), "writing", f"{staging_uri}/{REJECTS_NAME}")
    retried(_move_once(fs, f"{staging_root}/{REJECTS_NAME}", f"{root}/{REJECTS_NAME}"), "moving",
            f"{output_uri}/{REJECTS_NAME}")
    written = sorted((s for s in summaries if s["shard"]), key=lambda s: s["first_record"])
    rows = sum(n for per_split in counts.values() for n in per_split.values())
    if not written:
        retried(_delete_dir_once(fs, staging_root), "deleting", staging_uri)
        raise IngestError(f"all {len(rejects)} records were rejected; see {output_uri}/{REJECTS_NAME}")
    if len(fingerprints) != 1:
        raise IngestError(f"encoder actors disagree on the model fingerprint: {sorted(fingerprints)}")
    shards = []
    for i, summary in enumerate(written):
        shards.append(shard_name(i))
        retried(_move_once(fs, f"{staging_root}/{summary['shard']}", f"{root}/{shards[-1]}"), "moving shard",
                f"{output_uri}/{shards[-1]}")
    retried(_delete_dir_once(fs, staging_root), "deleting", staging_uri)
    model = cfg.model
    manifest = DatasetManifest(
        source={"format": cfg.source.format, "path": cfg.source.path},
        model={"preset": model.preset, "weights": model.weights, "init_seed": None if model.weights else cfg.init_seed,
               "image_size": model.image_size, "num_image_tokens": num_image_tokens(model.image_size),
               "fingerprint": fingerprints.pop()},
        counts=counts, rows=rows, shards=shards, rejects=len(rejects),
        val_fraction=cfg.split.fraction, val_count=cfg.split.val_count, seed=cfg.split.seed,
        limits=limits_report(cfg, rejects),
    )
    retried(lambda: manifest.write(output_uri), "writing the manifest", f"{output_uri}/{MANIFEST_NAME}")
    s3_retries = retried.retries + sum(summary.get("retries") or 0 for summary in summaries)
    return IngestResult(output_uri, manifest, rejects, time.monotonic() - started, s3_retries)


def limits_report(cfg: IngestConfig, rejects: list[Reject]) -> dict[str, dict[str, int]]:
    """Each per-record limit with its value and how many records it rejected (for the manifest)."""
    rejected = Counter(r.category for r in rejects)
    return {name: {"limit": getattr(cfg.limits, name), "rejected": rejected[category]}
            for name, category in LIMIT_CATEGORIES.items()}


def read_rejects(uri: str) -> list[Reject]:
    """The rejects of an ingested dataset (`_rejects.parquet`)."""
    fs, root = pyarrow_filesystem(uri)
    table = pq.read_table(f"{root.rstrip('/')}/{REJECTS_NAME}", filesystem=fs)
    return [Reject(**row) for row in table.to_pylist()]


def read_shards(uri: str, manifest: DatasetManifest | None = None) -> pa.Table:
    """Every shard row of an ingested dataset as one table (for checks and small datasets)."""
    manifest = manifest or DatasetManifest.read(uri)
    fs, root = pyarrow_filesystem(uri)
    tables = [pq.read_table(f"{root.rstrip('/')}/{name}", filesystem=fs) for name in manifest.shards]
    return pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()

