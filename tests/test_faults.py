"""Faults injected into the real services mid-run (issue 21, docs/reliability.md): nothing lost,
nothing silent.

- S3 down: the SeaweedFS process of a stack of this module's own is stopped (SIGTERM, SIGKILL
  after 1 s) and started again on the same ports and data folder (`faults.S3Outage`), while an
  ingest writes shards, while training reads row groups, while a model downloads.
- Disk full: the checkpoint path is a small tmpfs; the second checkpoint does not fit.
- A Serve replica killed under load with `ray.kill`.

What is checked is what was lost (nothing): shard rows against the manifest, checkpoints
loaded, requests counted. Timings are measured and printed (docs/reliability.md), never asserted.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from faults import S3Outage
from janus_lab.config import IngestConfig, load_config
from janus_lab.data import MANIFEST_NAME, REJECTS_NAME, DatasetManifest, read_shards, run_ingest, write_sample_dataset
from janus_lab.stack import LocalStack
from janus_lab.storage import pyarrow_filesystem

REPO = Path(__file__).resolve().parents[1]
SAMPLE_YAML = REPO / "jobs" / "configs" / "ingest_sample.yaml"
# Enough for a 10-30 s outage: 1+2+4+4+... s between tries, about 50 s in all.
RETRY = ["retry.attempts=14", "retry.first_delay_s=1", "retry.max_delay_s=4"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory):
    """An S3-only stack of this module's own, whose SeaweedFS the tests stop and start; the
    session's stack (MLflow, other tests' data) is left alone. Its AWS_* variables are set for
    the module and given to the module's Ray cluster."""
    stack = LocalStack.with_free_ports(tmp_path_factory.mktemp("outage-stack"), with_ray=False,
                                       with_mlflow=False, verbose=False)
    stack.up()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in stack.env().items():
                if name.startswith("AWS_"):
                    patch.setenv(name, value)
            yield stack
    finally:
        stack.down(timeout_s=3.0)


@pytest.fixture(scope="module")
def fault_ray(outage_stack):
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in outage_stack.env().items() if k.startswith("AWS_")}})
    yield
    ray.shutdown()


def object_names(uri: str) -> list[str]:
    fs, root = pyarrow_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def staged_shard_exists(uri: str):
    """A trigger: true once a writer task has put its first shard in the staging folder."""
    def check() -> bool:
        try:
            return any(n.startswith("_tmp-") and n.endswith(".parquet") for n in object_names(uri))
        except OSError:
            return False
    return check


def assert_dataset_whole(uri: str, records: list) -> DatasetManifest:
    """Every shard the manifest lists holds the rows it claims, nothing else is in the folder,
    and the ids are exactly the source's, once each."""
    manifest = DatasetManifest.read(uri)
    fs, root = pyarrow_filesystem(uri)
    per_shard = [pq.read_metadata(f"{root}/{name}", filesystem=fs).num_rows for name in manifest.shards]
    assert sum(per_shard) == manifest.rows == len(records)
    table = read_shards(uri, manifest)
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(records)
    counts = {task: {"train": 0, "val": 0} for task in manifest.counts}
    for task, split in zip(table["task"].to_pylist(), table["split"].to_pylist()):
        counts[task][split] += 1
    assert counts == manifest.counts
    assert object_names(uri) == sorted([*manifest.shards, REJECTS_NAME, MANIFEST_NAME])  # no staging, no partial
    return manifest


@pytest.fixture(scope="module")
def sample_source(tmp_path_factory):
    local = tmp_path_factory.mktemp("sample")
    return str(local), write_sample_dataset(local)


def ingest_config(source: str, output: str, *overrides: str) -> IngestConfig:
    # Small shards: ten writer tasks, so the outage falls among them.
    return load_config(IngestConfig, SAMPLE_YAML, [f"source.path={source}", f"output.uri={output}",
                                                   "output.rows_per_shard=8", "ray.batch_size=8",
                                                   "ray.records_per_task=8", *overrides])


# --------------------------------------------------------------------------- 1. S3 unavailable


@pytest.mark.timeout(240)
def test_ingest_rides_out_an_s3_outage_while_writing_shards(fault_ray, outage_stack, sample_source, caplog):
    uri = f"s3://{outage_stack.bucket}/faults/ingest-{uuid.uuid4().hex[:8]}"
    source, records = sample_source
    outage = S3Outage(outage_stack, trigger=staged_shard_exists(uri)).start()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="janus_lab.retry"):
        result = run_ingest(ingest_config(source, uri, *RETRY))
    outage.join()
    print(f"\ningest: S3 down {outage.down_s:.1f} s from the first staged shard; ingest took "
          f"{time.monotonic() - began:.1f} s, {result.s3_retries} storage steps retried")
    assert outage.stopped_at < outage.restarted_at  # the fault really happened mid-run
    assert result.s3_retries > 0, "the ingest never met the outage"
    manifest = assert_dataset_whole(uri, records)
    assert manifest.rows == result.manifest.rows == 80


# --------------------------------------------------------------------------- 5. disk full


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 60 MiB tmpfs: one debug-model checkpoint (about 39.5 MB, 2 ranks of about 19.7 MB) fits; of
    a second, each rank's part passes the free-space check alone and the copies together run
    out of space: a real ENOSPC mid-copy."""
    import subprocess

    mount = tmp_path / "ckpt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); run as root or with CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(180)
def test_a_full_checkpoint_disk_stops_the_job_naming_path_and_bytes(fault_ray, small_tmpfs, tmp_path):
    import ray.train
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from janus_lab.config import ExperimentConfig
    from janus_lab.train.launch import run_finetune
    from synthetic_shards import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "shards")
    cfg = load_config(ExperimentConfig, REPO / "jobs" / "configs" / "debug.yaml", [
        "name=disk-full", f"data.uri={dataset}", f"train.storage_path={small_tmpfs}", "train.max_steps=2",
        "train.report_every=1", "train.checkpoint_every=1", "train.eval_every=0",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        run_finetune(cfg)
    message = str(failed.value)
    print(f"\ndisk full: {message[message.find('no space left'):][:400]}")
    run_dir = small_tmpfs / "disk-full"
    assert "no space left on the checkpoint path" in message and f"{run_dir}/checkpoint_0000002" in message
    assert "bytes" in message.split("needs", 1)[1][:40]  # "needs N bytes"
    # The second checkpoint left nothing behind; the first loads whole, at its step.
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_0000001"]
    dcp_to_torch_save(run_dir / "checkpoint_0000001", tmp_path / "last-good.pt")
    import torch

    state = torch.load(tmp_path / "last-good.pt", weights_only=False)["train"]
    assert state["progress"]["step"] == 1
    assert state["model"] and all(torch.isfinite(t).all() for t in state["model"].values() if torch.is_tensor(t))


def test_a_failed_run_keeps_only_the_checkpoints_ray_train_registered(tmp_path):
    import json

    from janus_lab.train.launch import CHECKPOINT_SNAPSHOT, drop_unregistered_checkpoints

    run = tmp_path / "run"
    for name in ("checkpoint_0000001", "checkpoint_0000002"):
        (run / name).mkdir(parents=True)
        (run / name / "__0_0.distcp").write_bytes(b"x")
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_0000001", "metrics": {"step": 1}}]}))
    assert drop_unregistered_checkpoints(str(run), None) == ["checkpoint_0000002"]
    assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint_0000001", CHECKPOINT_SNAPSHOT])
