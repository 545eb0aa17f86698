"""Faults injected into the real services mid-run (issue 21, docs/reliability.md): nothing lost,
nothing silent.

- S3 down: the SeaweedFS process of a stack of this module's own is stopped (SIGTERM, SIGKILL
  after 1 s) and started again on the same ports and data folder (`faults.S3Outage`), while an
  ingest writes shards, while training reads row groups, while a model downloads; and during a
  fit, until it fails past its retry budget, then the fit submitted again resumes.
- Disk full: the checkpoint path is a small tmpfs; the second checkpoint does not fit.
- A Serve replica killed under load with `ray.kill`.

What is checked is what was lost (nothing): shard rows against the manifest, checkpoints
loaded, requests counted. Timings are measured and printed (docs/reliability.md), never asserted.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from faults import MLFLOW_OUTAGE_S, S3Outage
from janus_lab.config import load_config
from janus_lab.data import MANIFEST_NAME, REJECTS_NAME, DatasetManifest, read_shards, run_ingest, write_sample_dataset
from janus_lab.data.config import IngestConfig
from janus_lab.retry import S3RetryConfig
from janus_lab.retry import S3UnavailableError
from janus_lab.stack import LocalStack
from janus_lab.storage import pyarrow_filesystem

REPO = Path(__file__).resolve().parents[1]
SAMPLE_YAML = REPO / "jobs" / "configs" / "ingest_sample.yaml"
# Enough for a 10-30 s outage: 1+2+4+4+... s between tries, about 50 s in all.
RETRY = ["retry.attempts=14", "retry.first_delay_s=1", "retry.max_delay_s=4"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory):
    """An S3 + MLflow stack of this module's own, whose services the tests stop and start; the
    session's stack (other tests' data and runs) is left alone. Its AWS_* variables are set for
    the module and given to the module's Ray cluster."""
    stack = LocalStack.with_free_ports(tmp_path_factory.mktemp("outage-stack"), with_ray=False, verbose=False)
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


def reads_during(outage: S3Outage, layout, model_uri: str, cache: Path, results: dict):
    """Once S3 is down: the training stream's read of the train split, a model folder's download
    (what a Serve replica does for a new champion), and the same read with a budget shorter than
    the outage, each in a thread of its own; returns the threads."""
    import threading

    from janus_lab.data.stream import read_split
    from janus_lab.storage import download_prefix

    patient = S3RetryConfig(attempts=14, first_delay_s=1, max_delay_s=4)
    short = S3RetryConfig(attempts=2, first_delay_s=0.5, max_delay_s=0.5)
    calls = {
        "stream": lambda: [row["id"] for row in read_split(layout, "train", retry=patient)],
        "download": lambda: download_prefix(model_uri, cache, retry=patient),
        "short": lambda: read_split(layout, "train", retry=short),
    }

    def run(name, call):
        while outage.stopped_at is None or time.monotonic() < outage.stopped_at + 1.5:
            time.sleep(0.05)
        try:
            results[name] = call()
        except Exception as error:  # noqa: BLE001 - checked by the test
            results[name] = error
        results[f"{name}_done"] = time.monotonic()

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.timeout(300)
def test_an_s3_outage_mid_run_loses_nothing_and_a_short_budget_fails_naming_s3(fault_ray, outage_stack,
                                                                                sample_source, tmp_path):
    """SeaweedFS stopped once an ingest has staged its first shard, while training reads and a
    model download run too: the ingest finishes whole, the reads return every row once, the
    download is byte-identical; a budget shorter than the outage fails naming S3 and the URI,
    and run again once S3 is back, completes."""
    from janus_lab.data.stream import read_split, scan_layout
    from janus_lab.storage import upload_folder
    from synthetic_shards import write_synthetic_dataset

    base = f"s3://{outage_stack.bucket}/faults/outage-{uuid.uuid4().hex[:8]}"
    upload_folder(write_synthetic_dataset(tmp_path / "shards"), f"{base}/dataset")
    model = tmp_path / "model"
    model.mkdir()
    for name, size in (("config.json", 100), ("model.safetensors", 3_000_000)):
        (model / name).write_bytes(os.urandom(size))
    upload_folder(model, f"{base}/model")
    layout = scan_layout(f"{base}/dataset")
    expected = [row["id"] for row in read_split(layout, "train")]

    uri = f"{base}/ingest"
    source, records = sample_source
    outage = S3Outage(outage_stack, trigger=staged_shard_exists(uri)).start()
    results: dict = {}
    threads = reads_during(outage, layout, f"{base}/model", tmp_path / "cache", results)
    began = time.monotonic()
    result = run_ingest(ingest_config(source, uri, *RETRY))
    ingest_done = time.monotonic()
    for thread in threads:
        thread.join(150)
    outage.join()
    print(f"\nS3 down {outage.down_s:.1f} s (stop to answering again), from the first staged shard. Ingest: "
          f"{ingest_done - began:.1f} s, {result.s3_retries} storage steps retried, done "
          f"{ingest_done - outage.restarted_at:.1f} s after S3 was back. Stream read done "
          f"{results['stream_done'] - outage.restarted_at:.1f} s, download "
          f"{results['download_done'] - outage.restarted_at:.1f} s after. Short budget: {str(results['short'])[:200]}")
    # The fault really happened mid-run, and the ingest met it.
    assert outage.stopped_at < outage.restarted_at and result.s3_retries > 0
    manifest = assert_dataset_whole(uri, records)
    assert manifest.rows == result.manifest.rows == 80
    assert results["stream"] == expected  # every row once, in the same order
    folder = results["download"]
    assert isinstance(folder, Path), folder
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in model.iterdir())
    assert all((folder / f.name).read_bytes() == f.read_bytes() for f in model.iterdir())
    error = results["short"]
    assert isinstance(error, S3UnavailableError), error
    assert "S3 unavailable reading row groups of" in str(error) and f"{base}/dataset" in str(error)
    assert "retry.attempts" in str(error)
    # The rerun, with S3 back, completes.
    short = S3RetryConfig(attempts=2, first_delay_s=0.5, max_delay_s=0.5)
    assert [row["id"] for row in read_split(layout, "train", retry=short)] == expected


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fit_rides_out_an_s3_outage_while_uploading_a_checkpoint(fault_ray, outage_stack, tmp_path):
    """SeaweedFS stopped as the first checkpoint's folder appears (its upload under way): the
    upload retries, Ray Train's controller writes its record through the retrying filesystem,
    and the run finishes every step with its checkpoints whole."""
    from mlflow import MlflowClient
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from janus_lab.storage import download_prefix, upload_folder
    from janus_lab.train.config import ExperimentConfig
    from janus_lab.train.launch import run_finetune
    from synthetic_shards import write_synthetic_dataset

    base = f"s3://{outage_stack.bucket}/faults/fit-{uuid.uuid4().hex[:8]}"
    upload_folder(write_synthetic_dataset(tmp_path / "shards"), f"{base}/dataset")
    cfg = load_config(ExperimentConfig, REPO / "jobs" / "configs" / "debug.yaml", [
        "name=fit-outage", f"data.uri={base}/dataset", f"train.storage_path={base}/runs", "train.max_steps=6",
        "train.report_every=3", "train.checkpoint_every=3", "train.eval_every=0", "train.global_batch_size=8",
        "train.epochs=2", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *RETRY])
    run_dir = f"{base}/runs/fit-outage"

    def checkpoint_started() -> bool:
        try:
            return any(name.startswith("checkpoint_0") for name in object_names(run_dir))
        except OSError:
            return False

    outage = S3Outage(outage_stack, trigger=checkpoint_started).start()
    began = time.monotonic()
    result = run_finetune(cfg)
    finished = time.monotonic()
    outage.join()
    print(f"\nfit: S3 down {outage.down_s:.1f} s from the first checkpoint's upload; the 6-step run took "
          f"{finished - began:.1f} s, done {finished - outage.restarted_at:.1f} s after S3 was back")
    assert outage.stopped_at < finished and result.metrics["step"] == 6
    assert result.checkpoint_path.endswith("checkpoint_0000006")
    history = MlflowClient(cfg.tracking.tracking_uri).get_metric_history(result.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == [3, 6]
    names = object_names(run_dir)
    assert {n.split("/")[0] for n in names if n.startswith("checkpoint_0")} == {"checkpoint_0000003",
                                                                               "checkpoint_0000006"}
    dcp_to_torch_save(download_prefix(f"{run_dir}/checkpoint_0000006", tmp_path / "cache"), tmp_path / "last.pt")
    import torch

    assert torch.load(tmp_path / "last.pt", weights_only=False)["train"]["progress"]["step"] == 6


def s3_registered_steps(run_dir: str, retry: S3RetryConfig | None = None) -> list[int]:
    """`registered_steps` of a run folder in S3, [] before any; with `retry`, read through a
    server that is still starting (it answers `InternalError` for a second or two after `up()`),
    without, [] while S3 does not answer (a trigger's poll)."""
    import json

    from janus_lab.retry import with_s3_retries
    from janus_lab.train.launch import CHECKPOINT_SNAPSHOT

    fs, root = pyarrow_filesystem(f"{run_dir}/{CHECKPOINT_SNAPSHOT}")

    def read() -> dict:
        with fs.open_input_stream(root) as stream:
            return json.loads(stream.read().decode())

    try:
        snapshot = with_s3_retries(read, "reading", f"{run_dir}/{CHECKPOINT_SNAPSHOT}", retry) if retry else read()
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        if retry:
            raise
        return []
    return [entry["metrics"]["step"] for entry in snapshot.get("checkpoint_results", [])]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_fit_through_an_s3_outage_longer_than_its_budget_fails_naming_s3_and_a_rerun_resumes(
        fault_ray, outage_stack, tmp_path):
    """SeaweedFS stopped once the first checkpoint of an 8-step fit is registered, and kept down
    until the fit has failed (a retry budget of two tries): the error names S3; submitted again
    with the same name once S3 is back, the fit goes on from its last registered checkpoint, in
    the same MLflow run, to its last step and its export."""
    import threading

    from mlflow import MlflowClient
    from ray.train import TrainingFailedError

    from janus_lab.storage import upload_folder
    from janus_lab.train.config import ExperimentConfig
    from janus_lab.train.launch import run_finetune
    from synthetic_shards import write_synthetic_dataset

    steps = 8
    base = f"s3://{outage_stack.bucket}/faults/budget-{uuid.uuid4().hex[:8]}"
    upload_folder(write_synthetic_dataset(tmp_path / "shards"), f"{base}/dataset")
    cfg = load_config(ExperimentConfig, REPO / "jobs" / "configs" / "debug.yaml", [
        "name=fit-budget", f"data.uri={base}/dataset", f"train.storage_path={base}/runs", f"train.max_steps={steps}",
        "train.num_workers=1", "train.global_batch_size=2", "train.report_every=1", "train.checkpoint_every=3",
        "train.eval_every=0", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "retry.attempts=2", "retry.first_delay_s=0.5", "retry.max_delay_s=0.5"])
    run_dir = f"{base}/runs/fit-budget"
    failed_at = threading.Event()
    outage = S3Outage(outage_stack, seconds=0, trigger=lambda: bool(s3_registered_steps(run_dir)),
                      until=failed_at.is_set, deadline_s=300).start()
    began = time.monotonic()
    with pytest.raises(S3UnavailableError) as failed:  # any other error propagates as it is
        try:
            run_finetune(cfg)
        finally:
            failed_at.set()
    fit_failed = time.monotonic()
    outage.join()
    message = str(failed.value)
    patient = S3RetryConfig(attempts=14, first_delay_s=1, max_delay_s=4)
    kept = s3_registered_steps(run_dir, patient)
    folders_after_failure = sorted({n.split("/")[0] for n in object_names(run_dir) if n.startswith("checkpoint_0")})
    rerun_ms = int(time.time() * 1000)
    rerun_began = time.monotonic()
    result = run_finetune(cfg)
    rerun_took = time.monotonic() - rerun_began
    client = MlflowClient(cfg.tracking.tracking_uri)
    history = sorted(client.get_metric_history(result.mlflow_run_id, "loss"), key=lambda m: (m.timestamp, m.step))
    first = [m.step for m in history if m.timestamp < rerun_ms]
    second = [m.step for m in history if m.timestamp >= rerun_ms]
    tags = client.get_run(result.mlflow_run_id).data.tags
    names = object_names(run_dir)
    folders = sorted({n.split("/")[0] for n in names if n.startswith("checkpoint_0")})
    ray_message = str(failed.value.__cause__)
    print(f"\nfit past its budget: S3 stopped {outage.stopped_at - began:.1f} s into the fit, once checkpoint(s) "
          f"{kept} were registered; the fit failed {fit_failed - outage.stopped_at:.1f} s after the stop with "
          f"{type(failed.value).__name__}: {message[:400]} (Ray Train's own message, its cause, ends: "
          f"{ray_message[-160:]!r}), S3 back {outage.down_s:.1f} s after the stop. Checkpoint folders after the failure: "
          f"{folders_after_failure}. Rerun: {rerun_took:.1f} s, logged steps {second} (the failed attempt {first}), "
          f"resume_count {tags.get('resume_count')}, checkpoint folders {folders}, "
          f"export objects {sorted(n[len('export/'):] for n in names if n.startswith('export/'))}")
    # The fit failed during the outage, past its budget, saying S3 did not answer and where.
    assert outage.stopped_at < fit_failed < outage.restarted_at
    assert isinstance(failed.value.__cause__, TrainingFailedError)  # Ray Train's, kept as the cause
    assert message.startswith("fine-tuning fit-budget failed: S3 unavailable ") and f"{base}/" in message
    assert "gave up after 2 tries" in message and "retry.attempts" in message
    assert kept and kept[-1] < steps
    assert folders_after_failure == [f"checkpoint_{s:07d}" for s in kept]  # no unregistered folder left
    # The rerun went on from the last registered checkpoint, in the same MLflow run, to the end.
    registered = s3_registered_steps(run_dir, patient)
    assert result.metrics["step"] == steps and registered[-1] == steps
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [result.mlflow_run_id] and tags.get("resume_count") == "1"
    assert second == list(range(kept[-1] + 1, steps + 1))  # from the checkpoint on, once each
    # The failed attempt logged every step up to the checkpoint (and maybe some past it, trained
    # again by the rerun); together: every step, and none twice up to the checkpoint.
    assert first == list(range(1, len(first) + 1)) and len(first) >= kept[-1]
    assert sorted(set(first) | set(second)) == list(range(1, steps + 1))
    assert folders == [f"checkpoint_{s:07d}" for s in registered]
    assert any(n.startswith("export/") for n in names)


# --------------------------------------------------------------------------- 2. MLflow unavailable


@pytest.mark.timeout(180)
def test_metrics_logged_while_mlflow_is_down_arrive_once_each_in_order(outage_stack):
    """The MLflow server process stopped for the middle third of a run's steps: logging never
    waits on it, and once it is back every step is in the run's history exactly once."""
    from mlflow import MlflowClient

    from janus_lab.tracking import BufferedRunLogger

    uri = outage_stack.mlflow_tracking_uri
    logger = BufferedRunLogger.open_run(uri, "faults", f"mlflow-outage-{uuid.uuid4().hex[:6]}", params={}, tags={})
    logger.retry_delay_s = 1.0
    for step in range(1, 11):
        logger.log_metrics({"loss": 1.0 / step}, step)
    logger.flush(60)
    outage_stack.stop_service("mlflow", timeout_s=1.0)
    stopped = time.monotonic()
    waits = []
    for step in range(11, 31):
        began = time.monotonic()
        logger.log_metrics({"loss": 1.0 / step}, step)
        waits.append(time.monotonic() - began)
        time.sleep(0.2)  # a training step
    queued_while_down = logger.pending()
    time.sleep(max(0.0, MLFLOW_OUTAGE_S - (time.monotonic() - stopped)))
    outage_stack.up()
    restarted = time.monotonic()
    for step in range(31, 41):
        logger.log_metrics({"loss": 1.0 / step}, step)
    logger.flush(120)
    flushed = time.monotonic()
    logger.end()
    history = MlflowClient(uri).get_metric_history(logger.run_id, "loss")
    steps = sorted(m.step for m in history)
    print(f"\nMLflow down {restarted - stopped:.1f} s; {queued_while_down} metric batches queued meanwhile, "
          f"longest log_metrics call {max(waits) * 1000:.1f} ms; all sent {flushed - restarted:.1f} s after the "
          f"server was back; {logger.outages} outage(s) seen; history has {len(steps)} points")
    assert queued_while_down > 0  # the outage really held metrics back
    assert steps == list(range(1, 41))  # none lost, none twice
    assert all(abs(m.value - 1.0 / m.step) < 1e-9 for m in history)


# --------------------------------------------------------------------------- 4. a Ray node lost

STEPS = 10


def sweep_config(tmp_path: Path, tracking_uri: str, *overrides: str):
    """The debug masking ablation cut to two cells (t2i_text_drop 0.0 and 0.25), one trial at a
    time, `STEPS` steps each with every step logged and a checkpoint every 4, on the synthetic shards;
    Tune's and Ray Train's storage in `tmp_path`."""
    import dataclasses

    from janus_lab.sweeps.config import MaskingAblationConfig
    from synthetic_shards import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "shards")
    cfg = load_config(MaskingAblationConfig, REPO / "sweeps" / "configs" / "debug.yaml", [
        f"overrides.data.uri={dataset}", f"overrides.train.storage_path={tmp_path / 'runs'}",
        f"overrides.train.max_steps={STEPS}", "overrides.train.report_every=1", "overrides.train.checkpoint_every=4",
        f"run.storage_path={tmp_path / 'tune'}", "run.max_concurrent_trials=1",
        f"tracking.tracking_uri={tracking_uri}", f"tracking.experiment=faults-{uuid.uuid4().hex[:8]}", *overrides])
    return dataclasses.replace(cfg, grid={"masking.t2i_text_drop": [0.0, 0.25]})


def registered_steps(run_folder: Path) -> list[int]:
    """Steps of the checkpoints Ray Train registered for a run (its snapshot), [] before any."""
    import json

    from janus_lab.train.launch import CHECKPOINT_SNAPSHOT

    try:
        snapshot = json.loads((run_folder / CHECKPOINT_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return []
    return [entry["metrics"]["step"] for entry in snapshot.get("checkpoint_results", [])]


def child_runs(tracking_uri: str, experiment: str) -> dict:
    """The sweep's child runs by cell slug."""
    from mlflow import MlflowClient

    from janus_lab.sweeps.runner import SWEEP_CELL_TAG

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return {run.data.tags[SWEEP_CELL_TAG]: run for run in runs if SWEEP_CELL_TAG in run.data.tags}


def loss_points(tracking_uri: str, run_id: str) -> list:
    from mlflow import MlflowClient

    return sorted(MlflowClient(tracking_uri).get_metric_history(run_id, "loss"), key=lambda m: (m.timestamp, m.step))


@pytest.fixture
def head_held(fault_ray):
    """Every CPU the head node has free, held by an actor pinned to it: trials can only start
    on a node the test adds. Yields a function that lets the head's CPUs go."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    head = ray.get_runtime_context().get_node_id()
    holder = Holder.options(num_cpus=ray.available_resources()["CPU"],
                            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(holder.ready.remote(), timeout=60)
    released = []

    def release() -> None:
        if not released:
            ray.kill(holder)
            released.append(True)

    yield release
    release()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_whose_node_is_lost_resumes_its_trial_from_the_checkpoint_and_keeps_the_finished_one(
        fault_ray, outage_stack, head_held, tmp_path):
    """A second raylet joins the cluster and, the head's CPUs held, runs every trial of a 2-cell
    sweep; once the first trial has finished and the second has a registered checkpoint (step 4
    of 10), the node's whole process group is killed and the head's CPUs let go. Tune starts the
    lost trial again: it logs only the steps after its last checkpoint, into the same child run;
    the finished trial is not run again."""
    import threading

    import ray
    from ray.tune import ExperimentAnalysis

    from faults import RayWorkerNode
    from janus_lab.sweeps.grid import cell_slug, grid_cells
    from janus_lab.sweeps.masking import run_masking_ablation

    uri = outage_stack.mlflow_tracking_uri
    cfg = sweep_config(tmp_path, uri)
    folders = {cell_slug(cell): tmp_path / "runs" / f"{cfg.name}-{cell_slug(cell)}" for cell in grid_cells(cfg.grid)}
    node = RayWorkerNode(ray.get_runtime_context().gcs_address, num_cpus=3).start()
    seen: dict = {}

    def lose_the_node() -> None:
        deadline = time.monotonic() + 400
        finished: set = set()
        while not finished and time.monotonic() < deadline:
            finished = {slug for slug, run in child_runs(uri, cfg.tracking.experiment).items()
                        if run.info.status == "FINISHED"}
            time.sleep(0.5)
        while time.monotonic() < deadline:
            running = [slug for slug in folders if slug not in finished and registered_steps(folders[slug])]
            if running:
                node.kill()
                # Wall clock once the node is dead: every point of the first attempt is older.
                seen.update(finished=finished, lost=running[0], killed_ms=int(time.time() * 1000),
                            checkpoint=registered_steps(folders[running[0]])[-1],
                            dead_after_s=time.monotonic() - node.killed_at)
                head_held()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_the_node, daemon=True)
    killer.start()
    began = time.monotonic()
    try:
        outcome = run_masking_ablation(cfg)
    finally:
        node.kill()
        killer.join(30)
    took = time.monotonic() - began
    assert seen.get("lost"), "the node was never killed mid-trial"
    runs = child_runs(uri, cfg.tracking.experiment)
    trials = {cell_slug({"masking.t2i_text_drop": t.config["masking.t2i_text_drop"]}): t
              for t in ExperimentAnalysis(str(tmp_path / "tune" / cfg.name)).trials}
    history = {slug: loss_points(uri, run.info.run_id) for slug, run in runs.items()}
    lost = seen["lost"]
    after = [m.step for m in history[lost] if m.timestamp >= seen["killed_ms"]]
    before = [m.step for m in history[lost] if m.timestamp < seen["killed_ms"]]
    print(f"\nnode lost: killed once {sorted(seen['finished'])} had finished and {lost} had checkpoint step "
          f"{seen['checkpoint']}; marked dead {seen['dead_after_s']:.1f} s after the kill; sweep {took:.1f} s. "
          f"Failures per trial: { {slug: t.num_failures for slug, t in trials.items()} }. "
          f"{lost}: steps before the kill {before}, after {after}; "
          f"finished: { {slug: [m.step for m in history[slug]] for slug in seen['finished']} }")
    assert outcome.errors == 0 and len(runs) == 2
    assert all(run.info.status == "FINISHED" for run in runs.values())
    # The lost trial ran twice and went on from its checkpoint: no step lost, none before it redone.
    assert trials[lost].num_failures == 1
    assert sorted(set(before) | set(after)) == list(range(1, STEPS + 1))
    assert before == list(range(1, len(before) + 1)) and len(before) >= seen["checkpoint"]
    assert after == list(range(seen["checkpoint"] + 1, STEPS + 1))
    assert registered_steps(folders[lost])[-1] == STEPS
    # The finished trial was not run again: no failure, every step once, before the kill.
    for slug in seen["finished"]:
        assert trials[slug].num_failures == 0
        assert [m.step for m in history[slug]] == list(range(1, STEPS + 1))
        assert runs[slug].info.end_time < seen["killed_ms"]


def mlflow_outages(stack, triggers: list, seconds: float, record: list):
    """A thread that, for each trigger in turn, stops the MLflow server once it is true, keeps it
    down `seconds`, and starts it again; appends (name, stopped, back) in wall-clock ms to `record`."""
    import threading

    def run() -> None:
        for name, trigger in triggers:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                try:
                    if trigger():
                        break
                except Exception:  # noqa: BLE001 - the server restarting: ask again
                    pass
                time.sleep(0.2)
            else:
                return
            stopped = time.time()
            stack.stop_service("mlflow", timeout_s=1.0)
            time.sleep(max(0.0, seconds - (time.time() - stopped)))
            stack.up()
            record.append((name, int(stopped * 1000), int(time.time() * 1000)))

    thread = threading.Thread(target=run, name="mlflow-outages", daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_rides_out_mlflow_outages_in_training_at_a_trial_start_and_at_its_summary(
        fault_ray, outage_stack, tmp_path):
    """The MLflow server stopped three times during a 2-cell sweep: once the first trial has
    logged a step (training goes on, its metrics queued), once a trial has finished (the next
    trial opens its child run, logs its params and starts meanwhile), and once both have (the
    sweep writes its table, heatmap and best metric to the parent run). The sweep finishes
    without an error and every trial's history has each step exactly once."""
    from mlflow import MlflowClient
    from ray.tune import ExperimentAnalysis

    from janus_lab.sweeps.masking import run_masking_ablation

    uri = outage_stack.mlflow_tracking_uri
    cfg = sweep_config(tmp_path, uri)
    experiment = cfg.tracking.experiment

    def finished() -> int:
        return sum(run.info.status == "FINISHED" for run in child_runs(uri, experiment).values())

    triggers = [
        ("training", lambda: any(loss_points(uri, run.info.run_id) for run in child_runs(uri, experiment).values())),
        ("trial start", lambda: finished() == 1),
        ("summary", lambda: finished() == 2),
    ]
    outages: list = []
    thread = mlflow_outages(outage_stack, triggers, MLFLOW_OUTAGE_S, outages)
    began = time.monotonic()
    outcome = run_masking_ablation(cfg)
    took = time.monotonic() - began
    thread.join(MLFLOW_OUTAGE_S + 120)
    client = MlflowClient(uri)
    runs = child_runs(uri, experiment)
    history = {slug: loss_points(uri, run.info.run_id) for slug, run in runs.items()}
    parent = client.get_run(outcome.parent_run_id)
    during = {name: sum(stop <= m.timestamp < back for points in history.values() for m in points)
              for name, stop, back in outages}
    print(f"\nMLflow outages in a sweep ({took:.1f} s): "
          + "; ".join(f"{name}: down {(back - stop) / 1000:.1f} s, {during[name]} loss points logged meanwhile"
                      for name, stop, back in outages)
          + ". Child runs opened (s after the trial-start outage began): "
          + f"{[(run.info.start_time - outages[1][1]) / 1000 for run in runs.values()] if len(outages) > 1 else '-'}; "
          + f"parent ended {(parent.info.end_time - outages[-1][1]) / 1000:.1f} s after the summary outage began; "
          + f"steps per trial: { {slug: [m.step for m in points] for slug, points in history.items()} }")
    assert [name for name, _, _ in outages] == ["training", "trial start", "summary"]
    assert outcome.errors == 0 and len(runs) == 2
    assert all(run.info.status == "FINISHED" for run in runs.values()) and parent.info.status == "FINISHED"
    assert during["training"] > 0  # training went on while the server was down
    # No trial failed and was started again by Tune (run.max_failures would hide it).
    trials = ExperimentAnalysis(str(tmp_path / "tune" / cfg.name)).trials
    assert len(trials) == 2 and all(t.num_failures == 0 for t in trials)
    # The second trial's child run and the parent's end each waited for the server to come back.
    assert max(run.info.start_time for run in runs.values()) >= outages[1][2]
    assert parent.info.end_time >= outages[2][2]
    for points in history.values():
        assert sorted(m.step for m in points) == list(range(1, STEPS + 1))  # none lost, none twice
    assert {"results/results.csv", "results/results.md", "results/heatmap_val_nll.png"} <= {
        a.path for a in client.list_artifacts(outcome.parent_run_id, "results")}
    assert "best_val_nll" in parent.data.metrics


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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_full_checkpoint_disk_stops_the_job_naming_path_and_bytes(fault_ray, small_tmpfs, tmp_path):
    import ray.train
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from janus_lab.train.config import ExperimentConfig
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


# --------------------------------------------------------------------------- 3. a Serve replica killed under load

SERVE_APP = "janus-faults"
MODEL_OPTIONS = {
    "max_ongoing_requests": 2, "max_queued_requests": 16, "graceful_shutdown_timeout_s": 2,
    "user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.02, "registry_poll_s": 0},
    "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                           "upscale_delay_s": 1, "downscale_delay_s": 30, "metrics_interval_s": 0.5,
                           "look_back_period_s": 2},
}


@pytest.fixture(scope="module")
def fault_server(fault_ray):
    """serve/config.yaml's application on the debug model, in the module's cluster; yields its URL."""
    from ray import serve

    from conftest import free_port
    from serve_apps import bind_application, deployment_options, serve_config

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = deployment_options()
    options["ImageModel"].update(MODEL_OPTIONS)
    application = serve_config()["applications"][0]
    args = {**application["args"], "model": "debug",
            "access": {**application["args"]["access"], "requests_per_minute": 0, "images_per_minute": 0}}
    serve.run(bind_application(args, options), name=SERVE_APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def model_replicas() -> set[str]:
    """Names of the live ImageModel replica actors of the app."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)  # live ones only; no dashboard needed
    return {actor["name"] for actor in named if SERVE_APP in actor["name"] and "ImageModel" in actor["name"]}


class Tally:
    """Requests sent, answered 200, failed cleanly (a 5xx with an OpenAI-shaped error body) and
    lost (anything else: a dropped connection, a timeout, a bare 500)."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.sent = self.ok = self.clean_5xx = self.lost = 0
        self.lost_detail: list[str] = []
        self.ok_at: list[float] = []

    def send(self, base: str, seed: int) -> None:
        import requests

        with self.lock:
            self.sent += 1
        try:
            response = requests.post(f"{base}/v1/images/generations", json={"prompt": "a red circle", "seed": seed},
                                     timeout=90)
            outcome = self._classify(response)
        except requests.RequestException as error:
            outcome = f"lost: {type(error).__name__}"
        with self.lock:
            if outcome == "ok":
                self.ok += 1
                self.ok_at.append(time.monotonic())
            elif outcome == "clean":
                self.clean_5xx += 1
            else:
                self.lost += 1
                self.lost_detail.append(outcome)

    @staticmethod
    def _classify(response) -> str:
        if response.status_code == 200 and response.json().get("data"):
            return "ok"
        try:
            error = response.json()["error"]
        except ValueError:
            error = None
        if response.status_code >= 500 and error and error.get("message"):
            return "clean"
        return f"lost: HTTP {response.status_code} {response.text[:200]}"


@pytest.mark.timeout(240)
def test_a_replica_killed_under_load_loses_no_request_and_is_replaced(fault_server):
    import threading

    import ray
    import requests

    tally, stop = Tally(), threading.Event()

    def client(worker: int) -> None:
        seed = worker * 100_000
        while not stop.is_set():
            seed += 1
            tally.send(fault_server, seed)

    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 120
    while tally.ok < 4:  # under load: answers flowing, requests in flight
        assert time.monotonic() < deadline, "the server answered nothing"
        time.sleep(0.1)
    before = model_replicas()
    victim = sorted(before)[0]
    with tally.lock:
        sent_at_kill, in_flight = tally.sent, tally.sent - tally.ok - tally.clean_5xx - tally.lost
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    replaced_at = None
    while replaced_at is None and time.monotonic() < killed_at + 120:
        if model_replicas() - before:
            replaced_at = time.monotonic()
        time.sleep(0.25)
    ok_then = tally.ok
    while tally.ok < ok_then + 8 and time.monotonic() < killed_at + 150:  # load goes on over the new replica
        time.sleep(0.1)
    stop.set()
    for thread in clients:
        thread.join(120)
    print(f"\nreplica kill: sent {tally.sent} ({sent_at_kill} before the kill, {in_flight} in flight at it), "
          f"200 {tally.ok}, clean 5xx {tally.clean_5xx}, lost {tally.lost}; a new replica actor "
          f"{'%.1f s' % (replaced_at - killed_at) if replaced_at else 'never'} after the kill, the first 200 "
          f"after it {min((t for t in tally.ok_at if t > killed_at), default=killed_at) - killed_at:.1f} s after")
    assert tally.lost == 0, tally.lost_detail[:5]
    assert tally.sent == tally.ok + tally.clean_5xx and tally.sent > sent_at_kill
    assert replaced_at is not None, "the controller never started a replica in place of the killed one"
    assert victim not in model_replicas()
    assert Tally._classify(requests.post(f"{fault_server}/v1/images/generations",
                                         json={"prompt": "after the kill", "seed": 1}, timeout=90)) == "ok"


def test_a_call_whose_replica_died_goes_again_then_becomes_a_clean_503():
    """The API's own fallback under Serve's rerouting (which answered every request in the kill
    test above): a dead replica's call is sent again, and past `REPLICA_RETRIES` it is a 503."""
    import asyncio

    from ray.exceptions import ActorDiedError

    from janus_lab.serving.api import REPLICA_RETRIES, ApiError, ImageApi

    def failing(times: int):
        calls = []

        async def call():
            calls.append(1)
            if len(calls) <= times:
                raise ActorDiedError()
            return {"ok": len(calls)}

        return call

    call_model = ImageApi.func_or_class._call_model
    assert asyncio.run(call_model(failing(REPLICA_RETRIES), "a generation")) == {"ok": REPLICA_RETRIES + 1}
    with pytest.raises(ApiError) as refused:
        asyncio.run(call_model(failing(REPLICA_RETRIES + 1), "a generation"))
    assert (refused.value.status, refused.value.code) == (503, "replica_unavailable")
    assert refused.value.headers["Retry-After"].isdigit()


def test_only_errors_that_mean_s3_did_not_answer_are_retried():
    import errno

    from janus_lab.retry import is_unavailable

    assert is_unavailable(OSError("When reading information for key 'a/b' in bucket 'j': AWS Error "
                                  "NETWORK_CONNECTION during HeadObject operation: curlCode: 7"))
    assert is_unavailable(OSError("AWS Error INTERNAL_FAILURE during GetObject operation: We encountered an "
                                  "internal error, please try again."))
    assert is_unavailable(OSError("An error occurred (503) when calling the PutObject operation"))
    assert not is_unavailable(OSError("AWS Error ACCESS_DENIED for key 'runs/part-503.parquet'"))
    assert not is_unavailable(FileNotFoundError("s3://j/none"))
    assert not is_unavailable(OSError(errno.ENOSPC, "No space left on device"))
