"""Fine-tuning end to end on a local Ray cluster: Ray Train + FSDP2 on 2 CPU workers.

The runs are the real job (`run_finetune`, what `jobs/finetune.py` calls) on the debug model
and a small synthetic dataset in the ingested layout. Each `fit()` costs tens of seconds here,
so the module shares one uninterrupted run between several checks.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from janus_lab.config import load_config
from janus_lab.train.config import ExperimentConfig
from janus_lab.train.launch import PreflightError, preflight, run_finetune
from synthetic_shards import write_synthetic_dataset

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def ray_cluster(local_stack):
    # After the stack: the cluster's processes inherit its S3 and MLflow variables.
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("shards"))


def config(dataset, tmp_path, name: str, *overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, "jobs/configs/debug.yaml", [
        f"name={name}", f"data.uri={dataset}", f"train.storage_path={tmp_path / 'runs'}",
        f"train.max_steps={STEPS}", "train.report_every=1", "train.checkpoint_every=3", "train.eval_every=6",
        "train.lr=1e-2", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        # 2 workers x 2 samples x 2 accumulation; 40 training rows give 5 steps an epoch, so the
        # run crosses an epoch boundary after the first checkpoint (step 3).
        "train.global_batch_size=8", "train.epochs=2", *overrides,
    ])


def loss_history(cfg: ExperimentConfig, run_id: str) -> dict[int, list[float]]:
    from mlflow import MlflowClient

    history: dict[int, list[float]] = {}
    for metric in MlflowClient(cfg.tracking.tracking_uri).get_metric_history(run_id, "loss"):
        history.setdefault(metric.step, []).append(metric.value)
    return history


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, local_stack, dataset, tmp_path_factory):
    """One run the way a user runs it: shards, checkpoints and export in S3, the MLflow server."""
    from janus_lab.storage import upload_folder

    tmp = tmp_path_factory.mktemp("uninterrupted")
    root = f"s3://{local_stack.bucket}/tests/finetune-{os.getpid()}"
    upload_folder(dataset, f"{root}/shards")
    cfg = config(f"{root}/shards", tmp, "uninterrupted", f"train.storage_path={root}/runs",
                 f"tracking.tracking_uri={local_stack.mlflow_tracking_uri}")
    return cfg, run_finetune(cfg)


def test_training_lowers_validation_nll_and_exports(uninterrupted, local_stack):
    from mlflow import MlflowClient

    from janus_lab.model.weights import load_pretrained
    from janus_lab.storage import s3_filesystem, strip_scheme

    cfg, result = uninterrupted
    assert result.export_uri.startswith("s3://")
    client = MlflowClient(cfg.tracking.tracking_uri)
    val = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "val_nll")}
    assert 0 in val and STEPS in val
    assert val[STEPS] < val[0] - 0.3, val
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.tags["export_uri"] == result.export_uri
    assert "git_commit" in run.data.tags
    grids = [a.path for a in client.list_artifacts(result.mlflow_run_id, "samples")]
    assert "samples/step_0000000.png" in grids and f"samples/step_{STEPS:07d}.png" in grids, grids
    exported = load_pretrained(result.export_uri)
    assert exported.num_image_tokens == 16
    run_dir = f"{strip_scheme(cfg.train.storage_path)}/{cfg.name}"
    checkpoints = sorted(p.rsplit("/", 1)[-1] for p in s3_filesystem().ls(run_dir) if "/checkpoint_0" in p)
    # checkpoint_every=3: steps 3 and 6 (the last); keep_checkpoints=2 keeps both.
    assert checkpoints == ["checkpoint_0000003", "checkpoint_0000006"], checkpoints
    assert sorted(loss_history(cfg, result.mlflow_run_id)) == list(range(1, STEPS + 1))


def _kill_a_worker_after_checkpoint(run_dir, stop: threading.Event, killed: list, registered: str = "") -> None:
    """Waits for the first checkpoint, then SIGKILLs one Ray Train worker process.

    With `registered`, waits until Ray Train's checkpoint manager has recorded that checkpoint
    (a resubmitted job can only resume from one it recorded).
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while not stop.is_set():
        if registered:
            if snapshot.exists() and registered in snapshot.read_text():
                break
        elif run_dir.exists() and any(run_dir.glob("checkpoint_0*")):
            break
        time.sleep(0.2)
    # ray.init(address="local") made this process the parent of the whole cluster.
    workers = [p for p in psutil.Process().children(recursive=True)
               if "RayTrainWorker" in " ".join(p.cmdline())]
    if workers and not stop.is_set():
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        killed.append(victim.pid)


def assert_killed_run_matches(cfg: ExperimentConfig, reference, tmp_path) -> None:
    """Runs `cfg` with a worker killed after its first checkpoint and compares its losses with
    the uninterrupted `reference` (config, result)."""
    reference_cfg, reference_result = reference
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_checkpoint,
                              args=(tmp_path / "runs" / cfg.name, stop, killed), daemon=True)
    killer.start()
    try:
        result = run_finetune(cfg)
    finally:
        stop.set()
        killer.join(timeout=30)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    history = loss_history(cfg, result.mlflow_run_id)
    expected = {step: values[0] for step, values in loss_history(reference_cfg, reference_result.mlflow_run_id).items()}
    # Every step ran (none skipped); steps redone after the restart saw the same data and
    # weights, so each logged the same loss as the uninterrupted run.
    assert sorted(history) == list(range(1, STEPS + 1))
    assert any(len(values) > 1 for values in history.values()), "no step was redone after the restart"
    for step, values in history.items():
        for value in values:
            assert value == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, values, expected[step])


def test_killed_worker_resumes_with_identical_losses(uninterrupted, dataset, tmp_path):
    assert_killed_run_matches(config(dataset, tmp_path, "killed", "train.max_failures=2"), uninterrupted, tmp_path)


def test_preflight_errors_say_what_to_change(dataset, tmp_path):
    missing = load_config(ExperimentConfig, "jobs/configs/debug.yaml", [f"data.uri={tmp_path / 'nothing'}"])
    with pytest.raises(PreflightError, match="no _manifest.json"):
        preflight(missing)
    weights = load_config(ExperimentConfig, "jobs/configs/debug.yaml",
                          [f"data.uri={dataset}", f"model.weights={tmp_path / 'no-weights'}"])
    with pytest.raises(PreflightError, match="does not exist"):
        preflight(weights)
    huge = load_config(ExperimentConfig, "jobs/configs/debug.yaml",
                       [f"data.uri={dataset}", "train.global_batch_size=4000"])
    with pytest.raises(PreflightError, match="fewer than one global batch"):
        preflight(huge)
    wrong_side = load_config(ExperimentConfig, "jobs/configs/debug.yaml",
                             [f"data.uri={dataset}", "model.image_size=384"])
    with pytest.raises(PreflightError, match="re-ingest"):
        preflight(wrong_side)


def test_preflight_refuses_a_dataset_encoded_by_another_random_vq(dataset, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "_manifest.json").read_text())
    manifest["model"]["init_seed"] = 7
    (copy / "_manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(ExperimentConfig, "jobs/configs/debug.yaml", [f"data.uri={copy}"])
    with pytest.raises(PreflightError, match="set train.seed=7"):
        preflight(cfg)


def test_a_model_checks_the_dataset_was_encoded_by_its_own_tokenizer():
    from janus_lab.data.ingest import vq_fingerprint
    from janus_lab.model.weights import build_bundle
    from janus_lab.train.loop import DatasetTokenizerMismatch, check_dataset_tokenizer

    own = build_bundle(load_config(ExperimentConfig, "jobs/configs/debug.yaml", []).model, init_seed=0)
    other = build_bundle(load_config(ExperimentConfig, "jobs/configs/debug.yaml", []).model, init_seed=1)
    check_dataset_tokenizer(own, vq_fingerprint(own.model, own.processor.tokenizer), "s3://b/d")
    check_dataset_tokenizer(own, None, "s3://b/d")  # codes no tokenizer made (synthetic patterns)
    with pytest.raises(DatasetTokenizerMismatch, match="s3://b/d was encoded by a VQ tokenizer .* Re-ingest"):
        check_dataset_tokenizer(own, vq_fingerprint(other.model, other.processor.tokenizer), "s3://b/d")


def test_a_job_on_a_dataset_of_another_tokenizer_fails_before_training(ray_cluster, dataset, tmp_path):
    """The stale-dataset case: same preset and seed, but the tokenizer's weights changed since
    ingest (a retrained tokenizer shipped under the same name). The job stops at the check."""
    import json
    import shutil

    copy = tmp_path / "stale"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "_manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 64
    (copy / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="encoded by a VQ tokenizer with fingerprint 000000000000"):
        run_finetune(config(copy, tmp_path, "stale"))
    assert not (tmp_path / "runs" / "stale" / "export").exists()


def test_preflight_refuses_a_prompt_cap_below_the_datasets(dataset, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "_manifest.json").read_text())
    manifest["limits"] = {"max_text_tokens": {"limit": 512, "rejected": 0}}
    (copy / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PreflightError, match="prompts of up to 512 tokens .* set data.max_text_tokens=512"):
        preflight(load_config(ExperimentConfig, "jobs/configs/debug.yaml", [f"data.uri={copy}"]))
    preflight(load_config(ExperimentConfig, "jobs/configs/debug.yaml",
                          [f"data.uri={copy}", "data.max_text_tokens=512"]))


def test_a_dataset_without_a_val_split_plans_no_validation(tmp_path):
    no_val = write_synthetic_dataset(tmp_path / "no-val", num_val=0)  # ingested with split.val_fraction=0
    *_, val_rows = preflight(load_config(ExperimentConfig, "jobs/configs/debug.yaml", [f"data.uri={no_val}"]))
    assert val_rows == 0  # the loop then never validates (LoopPlan.val_rows)


def test_a_failed_job_submitted_again_resumes_into_its_mlflow_run(uninterrupted, dataset, tmp_path):
    """The job fails (a worker killed after the step-3 checkpoint, no restarts allowed); the same
    job submitted again resumes from that checkpoint and logs into the first submission's run."""
    from mlflow import MlflowClient
    from ray.train import TrainingFailedError

    from janus_lab.train.launch import RESUME_COUNT_TAG

    reference_cfg, reference = uninterrupted
    cfg = config(dataset, tmp_path, "resubmitted", "train.max_failures=0")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_checkpoint, daemon=True,
                              args=(tmp_path / "runs" / "resubmitted", stop, killed, "checkpoint_0000003"))
    killer.start()
    try:
        with pytest.raises(TrainingFailedError):
            run_finetune(cfg)
    finally:
        stop.set()
        killer.join(timeout=30)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    client = MlflowClient(cfg.tracking.tracking_uri)
    [failed] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert failed.info.status == "FAILED"
    steps_before = sorted(loss_history(cfg, failed.info.run_id))
    assert steps_before[:3] == [1, 2, 3] and steps_before[-1] < STEPS, steps_before

    result = run_finetune(cfg)  # submitted again, unchanged

    assert result.mlflow_run_id == failed.info.run_id
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags[RESUME_COUNT_TAG] == "1"
    assert not any(key.endswith(".changed") for key in run.data.tags)  # same config, nothing changed
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = loss_history(cfg, result.mlflow_run_id)
    expected = {step: values[0] for step, values in loss_history(reference_cfg, reference.mlflow_run_id).items()}
    assert sorted(history) == list(range(1, STEPS + 1))
    assert [len(history[step]) for step in (1, 2, 3)] == [1, 1, 1], "steps before the checkpoint were redone"
    for step, values in history.items():
        for value in values:
            assert value == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, values, expected[step])
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "config")}
    assert artifacts == {"config/resolved.yaml", "config/resume_1.yaml"}


LORA = ("train.lora.rank=4", "train.lora.lr=2e-2")


@pytest.fixture(scope="module")
def registered_base(uninterrupted, local_stack) -> str:
    """The uninterrupted run's export registered as a model's first version; its alias URI."""
    from janus_lab.registry import PromoteConfig, promote

    _, full_run = uninterrupted
    name = f"lora-base-{os.getpid()}"
    promote(PromoteConfig(run_id=full_run.mlflow_run_id, name=name, tracking_uri=local_stack.mlflow_tracking_uri))
    return f"models:/{name}@champion"


def lora_config(dataset, tmp_path, name: str, base: str, tracking_uri: str, *overrides: str) -> ExperimentConfig:
    """A rank-4 LoRA run on `base`, a registered version named by its alias, logged to the server
    whose registry holds it."""
    return config(dataset, tmp_path, name, *LORA, f"model.weights={base}", f"tracking.tracking_uri={tracking_uri}",
                  *overrides)


@pytest.fixture(scope="module")
def lora_uninterrupted(ray_cluster, dataset, registered_base, local_stack, tmp_path_factory):
    """A LoRA run to the end on the registered base, checkpoints and export on local disk, logged
    to the stack's MLflow server (whose registry holds the base)."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = lora_config(dataset, tmp, "lora", registered_base, local_stack.mlflow_tracking_uri)
    return cfg, run_finetune(cfg)


def checkpoint_model_keys(folder) -> list[str]:
    """The model tensors a DCP checkpoint folder holds (read from its metadata alone)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return [key.removeprefix("train.model.") for key in keys if key.startswith("train.model.")]


def test_a_lora_run_trains_and_checkpoints_only_its_adapters_and_exports_a_peft_adapter(lora_uninterrupted,
                                                                                        registered_base):
    from mlflow import MlflowClient

    from janus_lab.generation import GenerationEngine, GenerationRequest
    from janus_lab.generation.loading import load_generation_model
    from janus_lab.model.adapters import ADAPTER_CONFIG, BASE_FILE, read_base

    cfg, result = lora_uninterrupted
    pinned = registered_base.replace("@champion", "/1")
    assert cfg.model.weights == pinned  # the alias, pinned to its version when the run started
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags["export_kind"] == "adapter"
    assert run.data.tags["adapter_base"] == pinned
    metrics = run.data.metrics
    # rank 4 over 7 projections in 2 layers of hidden 64 (ffn 128): 2 x 4 x (4 x 128 + 3 x 192) = 8704
    assert metrics["trainable_params"] == 8704
    assert metrics["optimizer_state_bytes"] > 0 and metrics["gradient_bytes"] > 0
    val = {m.step: m.value for m in MlflowClient(cfg.tracking.tracking_uri).get_metric_history(
        result.mlflow_run_id, "val_nll")}
    assert val[STEPS] < val[0], val
    keys = checkpoint_model_keys(result.checkpoint_path)
    assert keys and all(".lora_" in key for key in keys), keys[:5]
    assert len(keys) == 2 * 2 * 7  # A and B of 7 projections in 2 layers
    export = result.export_uri
    assert (os.path.exists(f"{export}/{ADAPTER_CONFIG}") and os.path.exists(f"{export}/{BASE_FILE}")
            and not os.path.exists(f"{export}/config.json"))
    assert read_base(export).identity == pinned
    adapted = GenerationEngine.from_bundle(load_generation_model(export))
    request = [GenerationRequest("a red circle", temperature=0, seed=1)]
    assert adapted.generate(request)[0].codes.shape == (1, 16)


def test_a_killed_lora_worker_resumes_with_identical_losses(lora_uninterrupted, registered_base, local_stack, dataset,
                                                            tmp_path):
    """Only the adapters and their AdamW state are in the checkpoint; the frozen base is built
    again from its source, and the losses are the uninterrupted run's."""
    cfg = lora_config(dataset, tmp_path, "lora-killed", registered_base, local_stack.mlflow_tracking_uri,
                      "train.max_failures=2")
    assert_killed_run_matches(cfg, lora_uninterrupted, tmp_path)


def test_a_promoted_adapter_loads_from_the_registry_over_its_base_version(lora_uninterrupted, local_stack):
    """An adapter run promoted into its own registered model: the version says what it is and what
    it belongs to, and `models:/<adapter>@champion` generates what the adapter over that base makes."""
    import torch
    from mlflow import MlflowClient

    from janus_lab.generation import GenerationEngine, GenerationRequest
    from janus_lab.generation.loading import load_generation_model
    from janus_lab.registry import PromoteConfig, promote

    cfg, result = lora_uninterrupted
    tracking = local_stack.mlflow_tracking_uri
    name = f"lora-style-{os.getpid()}"
    promoted = promote(PromoteConfig(run_id=result.mlflow_run_id, name=name, tracking_uri=tracking))
    tags = MlflowClient(tracking).get_model_version(name, promoted.version).tags
    assert tags["export_kind"] == "adapter" and tags["adapter_base"] == cfg.model.weights

    requests = [GenerationRequest("a red circle", parallel_size=2, temperature=0, seed=1)]
    from_registry = GenerationEngine.from_bundle(load_generation_model(f"models:/{name}@champion"))
    from_export = GenerationEngine.from_bundle(load_generation_model(result.export_uri))
    assert torch.equal(from_registry.generate(requests)[0].codes, from_export.generate(requests)[0].codes)
