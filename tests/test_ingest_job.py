"""The ingest job end to end: Ray Data on a local cluster against the local S3 server (sample data,
bad records, Echo-4o parts, a killed ingest, overwrite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from janus_lab.config import load_config
from janus_lab.data import (
    MANIFEST_NAME,
    IngestError,
    REJECTS_NAME,
    SHARD_SCHEMA,
    DatasetManifest,
    OutputExistsError,
    read_rejects,
    read_shards,
    run_ingest,
    split_of,
    write_sample_dataset,
)
from janus_lab.data.config import IngestConfig
from janus_lab.data.images import decode_png_pixels
from janus_lab.data.ingest import (
    vq_fingerprint,
)
from janus_lab.storage import pyarrow_filesystem, upload_folder
from bad_sources import BAD_SOURCE_GOOD, BAD_SOURCE_LIMITS, janus_square, write_bad_source

REPO = Path(__file__).resolve().parents[1]
SAMPLE_YAML = REPO / "jobs" / "configs" / "ingest_sample.yaml"



pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- the job on Ray + local S3


@pytest.fixture(scope="module")
def ray_cluster(local_stack):
    """One local Ray cluster for the module; returns its address (for a second driver)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {k: v for k, v in local_stack.env().items() if k.startswith("AWS_")}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_root(local_stack) -> str:
    return f"s3://{local_stack.bucket}/test-ingest-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def sample_source(tmp_path_factory, s3_root):
    """The sample data, uploaded to S3 (tars and JSON as they are: ingest reads them in place)."""
    local = tmp_path_factory.mktemp("sample")
    records = write_sample_dataset(local)
    upload_folder(local, f"{s3_root}/raw/sample")
    return f"{s3_root}/raw/sample", records


def ingest_config(source: str, output: str, *overrides: str, fmt: str = "sharegpt4o") -> IngestConfig:
    return load_config(IngestConfig, SAMPLE_YAML, [f"source.format={fmt}", f"source.path={source}",
                                                   f"output.uri={output}", "ray.records_per_task=16", *overrides])


@pytest.fixture(scope="module")
def sample_dataset(ray_cluster, sample_source, s3_root):
    uri = f"{s3_root}/shards/sample"
    return uri, run_ingest(ingest_config(sample_source[0], uri))


def object_names(uri: str) -> list[str]:
    from pyarrow import fs as pafs

    fs, root = pyarrow_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def counts_of(table: pa.Table) -> dict:
    counts = {task: {"train": 0, "val": 0} for task in ("t2i", "ti2i")}
    for task, split in zip(table["task"].to_pylist(), table["split"].to_pylist()):
        counts[task][split] += 1
    return counts


@pytest.mark.integration
def test_sample_ingest_to_s3_has_exact_counts(sample_dataset, sample_source):
    uri, result = sample_dataset
    records = sample_source[1]
    manifest = DatasetManifest.read(uri)
    assert manifest == result.manifest
    table = read_shards(uri, manifest)
    assert table.schema.equals(SHARD_SCHEMA) and table.num_rows == manifest.rows == len(records) == 80
    assert counts_of(table) == manifest.counts
    assert {t: sum(s.values()) for t, s in manifest.counts.items()} == {"t2i": 48, "ti2i": 32}
    ids = table["id"].to_pylist()
    stems = {"t2i": "text_to_image.json", "ti2i": "text_and_image_to_image.json"}
    assert sorted(ids) == sorted(f"{stems[r.task]}:{r.output_path}" for r in records)
    assert table["split"].to_pylist() == [split_of(i, 0, 0.1) for i in ids]
    for row in table.to_pylist():
        assert len(row["output_codes"]) == 16 and len(row["input_codes"]) == len(row["input_pixels"])
        assert (row["task"] == "ti2i") == bool(row["input_codes"])
        assert all(decode_png_pixels(png).shape == (64, 64, 3) for png in row["input_pixels"])
    assert sum(len(c) == 2 for c in table["input_codes"].to_pylist()) == 8
    assert read_rejects(uri) == [] and manifest.rejects == 0
    assert object_names(uri) == sorted([*manifest.shards, REJECTS_NAME, MANIFEST_NAME])  # no staging left
    assert manifest.source == {"format": "sharegpt4o", "path": sample_source[0]}
    model = manifest.model
    assert (model["preset"], model["image_size"], model["num_image_tokens"]) == ("debug", 64, 16)
    assert model["init_seed"] == 42 and model["weights"] is None


@pytest.mark.integration
def test_ingested_shards_mix_the_sources_in_small_row_groups(sample_dataset):
    uri, result = sample_dataset
    fs, root = pyarrow_filesystem(uri)
    for name in result.manifest.shards:
        with fs.open_input_file(f"{root}/{name}") as handle:
            shard = pq.ParquetFile(handle)
            assert shard.metadata.num_rows <= 32 and shard.metadata.row_group(0).num_rows <= 128
            tables = [shard.read_row_group(i) for i in range(shard.metadata.num_row_groups)]
        assert all(len(set(t["split"].to_pylist())) == 1 for t in tables)
        if shard.metadata.num_rows >= 16:
            assert len({s for t in tables for s in t["source"].to_pylist()}) == 2, name


@pytest.mark.integration
def test_ingested_codes_are_encode_vq_codes_of_the_resized_images(sample_dataset, sample_source):
    from janus_lab.model import debug, encode_vq_codes, image_to_tensor

    uri, result = sample_dataset
    rows = {row["id"].split(":")[1]: row for row in read_shards(uri).to_pylist()}
    bundle = debug(seed=42)
    assert result.manifest.model["fingerprint"] == vq_fingerprint(bundle.model, bundle.processor.tokenizer)
    records = sample_source[1]
    chosen = [r for r in records if r.task == "t2i"][:3] + [r for r in records if len(r.inputs) == 2][:2]
    for record in chosen:
        row = rows[record.output_path]
        images = [record.output_image(), *record.input_images()]
        expected = encode_vq_codes(bundle.model, torch_stack([image_to_tensor(i, 64) for i in images])).tolist()
        assert [row["output_codes"], *row["input_codes"]] == expected
        for png, image in zip(row["input_pixels"], record.input_images()):
            assert np.array_equal(decode_png_pixels(png), janus_square(image, 64))


def torch_stack(tensors):
    import torch

    return torch.stack(tensors)


@pytest.mark.integration
def test_bad_records_give_exact_rejects_and_the_good_ones_intact(ray_cluster, tmp_path, s3_root):
    expected = write_bad_source(tmp_path / "src")
    uri = f"{s3_root}/shards/bad"
    result = run_ingest(ingest_config(str(tmp_path / "src"), uri, *BAD_SOURCE_LIMITS))
    rejects = read_rejects(uri)
    assert {(r.source_file, r.record_index): r.category for r in rejects} == expected
    assert len(rejects) == result.manifest.rejects == len(expected) == 15
    assert result.manifest.limits == {"max_text_tokens": {"limit": 64, "rejected": 1},
                                      "max_image_pixels": {"limit": 100000, "rejected": 2}}
    assert "dropped by limits: 1 over max_text_tokens=64, 2 over max_image_pixels=100000" in result.summary()
    assert [(r.source_file, r.record_index) for r in rejects] == sorted(expected)  # in source order
    by_key = {(r.source_file, r.record_index): r.reason for r in rejects}
    assert by_key[("text_to_image.json", 6)] == "path escapes source root: ../outside.png"
    assert by_key[("text_to_image.json", 3)] == "missing image: image/nowhere.png"
    assert by_key[("text_to_image.json", 15)].startswith("image too large: image/too_big.png (header claims 400x400")
    assert by_key[("text_to_image.json", 10)].startswith("prompt too long: prompt has")
    table = read_shards(uri)
    good = {("text_to_image.json", i): "t2i" for i in (0, 1, 2, 12, 14)}
    good |= {("text_and_image_to_image.json", i): "ti2i" for i in (0, 1)}
    assert table.num_rows == result.manifest.rows == len(BAD_SOURCE_GOOD) == 7
    assert sorted(zip(table["source"].to_pylist(), table["task"].to_pylist())) == sorted(
        (f"sharegpt4o:{f}", task) for (f, _), task in good.items())
    assert sorted(len(c) for c in table["input_codes"].to_pylist()) == [0, 0, 0, 0, 0, 1, 2]


@pytest.mark.integration
def test_nothing_usable_fails_after_writing_the_rejects(ray_cluster, tmp_path, s3_root):
    (tmp_path / "text_to_image.json").write_text(json.dumps([
        {"input_prompt": " ", "output_image": "image/a.png"}, {"input_prompt": "x", "output_image": "../a.png"}]))
    uri = f"{s3_root}/shards/nothing"
    with pytest.raises(IngestError, match="all 2 records were rejected"):
        run_ingest(ingest_config(str(tmp_path), uri))
    assert object_names(uri) == [REJECTS_NAME] and len(read_rejects(uri)) == 2


@pytest.mark.integration
def test_echo4o_parts_are_streamed_from_s3(ray_cluster, tmp_path, s3_root):
    written = write_sample_dataset(tmp_path, "echo4o", num_t2i=6, num_ti2i=4)
    upload_folder(tmp_path, f"{s3_root}/raw/echo")
    uri = f"{s3_root}/shards/echo"
    result = run_ingest(ingest_config(f"{s3_root}/raw/echo", uri, fmt="echo4o"))
    table = read_shards(uri)
    assert table.num_rows == 10 and result.manifest.rejects == 0
    assert sorted(table["prompt"].to_pylist()) == sorted(r.prompt for r in written)
    assert sorted(len(c) for c in table["input_codes"].to_pylist()) == sorted(len(r.inputs) for r in written)


@pytest.mark.integration
def test_a_killed_ingest_leaves_no_manifest_and_a_rerun_completes(ray_cluster, sample_source, s3_root):
    uri = f"{s3_root}/shards/killed"
    # A second driver on the module's cluster, killed as soon as its first shard is staged.
    job = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "ingest.py"), "--config", str(SAMPLE_YAML),
         f"source.path={sample_source[0]}", f"output.uri={uri}", "output.rows_per_shard=2", "ray.batch_size=2",
         "ray.records_per_task=4"],
        env=dict(os.environ, RAY_ADDRESS=ray_cluster), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not any(name.startswith("_tmp-") and name.endswith(".parquet") for name in object_names(uri)):
        assert job.poll() is None, job.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the job staged no shard in time"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    left = object_names(uri)
    assert MANIFEST_NAME not in left and any(name.startswith("_tmp-") for name in left)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        DatasetManifest.read(uri)

    result = run_ingest(ingest_config(sample_source[0], uri))
    assert result.manifest.rows == 80
    assert object_names(uri) == sorted([*result.manifest.shards, REJECTS_NAME, MANIFEST_NAME])
    assert counts_of(read_shards(uri)) == result.manifest.counts


@pytest.mark.integration
def test_a_finished_dataset_is_replaced_only_with_overwrite(sample_dataset, sample_source):
    uri, first = sample_dataset
    with pytest.raises(OutputExistsError, match="output.overwrite=true"):
        run_ingest(ingest_config(sample_source[0], uri))
    assert DatasetManifest.read(uri) == first.manifest  # untouched
    again = run_ingest(ingest_config(sample_source[0], uri, "output.overwrite=true", "split.seed=1",
                                     "output.rows_per_shard=64", "split.val_fraction=null", "split.val_count=5"))
    manifest = DatasetManifest.read(uri)
    assert manifest == again.manifest and manifest.seed == 1 and manifest.rows == 80
    assert (manifest.val_fraction, manifest.val_count) == (None, 5)
    assert sum(per_split["val"] for per_split in manifest.counts.values()) == 5  # by count: exactly 5
    assert object_names(uri) == sorted([*manifest.shards, REJECTS_NAME, MANIFEST_NAME])  # old shards gone
    assert counts_of(read_shards(uri)) == manifest.counts
