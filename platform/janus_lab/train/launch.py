"""Driver side of fine-tuning: checks before any worker starts, then a Ray Train `TorchTrainer`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from janus_lab.cluster import forwarded_env, ray_storage
from janus_lab.config import flatten, to_dict
from janus_lab.data.schema import DatasetManifest
from janus_lab.data.stream import DatasetLayout, scan_layout, steps_per_epoch
from janus_lab.patches import num_image_tokens
from janus_lab.retry import S3UnavailableError
from janus_lab.storage import is_s3_uri
from janus_lab.train.config import ExperimentConfig
from janus_lab.train.loop import LoopPlan, train_loop_per_worker

if TYPE_CHECKING:
    from janus_lab.tracking import RunLogger

# Samples of the sample grid logged at each validation.
RUN_DIR_TAG = "train_run_dir"
"""Tag: where the run keeps its checkpoints; a later submission with the same folder resumes it."""
RESUME_COUNT_TAG = "resume_count"
"""Tag: how many later submissions resumed this run from its checkpoints."""
DEFAULT_SAMPLE_PROMPTS = ["a red circle on a white background", "a blue square on a yellow background"]


class PreflightError(ValueError):
    """The run cannot start; the message says what to change."""


@dataclass
class FinetuneResult:
    """What a finished fine-tuning run left behind."""

    run_name: str
    checkpoint_path: str | None
    export_uri: str
    mlflow_run_id: str | None
    mlflow_url: str | None
    metrics: dict | None


def preflight(cfg: ExperimentConfig) -> tuple[dict, int, int, int]:
    """Checks the run can start and works out its length.

    Returns:
        (manifest, steps per epoch, total steps, validation rows).

    Raises:
        PreflightError: missing manifest or weights, a dataset made with another model's VQ
            tokenizer, or too little data for one optimizer step.
    """
    try:
        manifest = DatasetManifest.read(cfg.data.uri)
    except (FileNotFoundError, ValueError) as error:  # missing, unfinished, or of another schema version
        raise PreflightError(f"data.uri={cfg.data.uri}: {error}") from None
    weights = cfg.model.weights
    if weights and not is_s3_uri(weights) and not weights.startswith("models:/") and not os.path.isdir(weights):
        raise PreflightError(f"model.weights={cfg.model.weights} does not exist; point it at a Hugging Face "
                             "format checkpoint folder (convert DeepSeek checkpoints with "
                             "`python -m janus_lab.model.convert`) or an s3:// prefix")
    tokens = manifest.model.get("num_image_tokens")
    expected = num_image_tokens(cfg.model.image_size)
    if tokens is not None and int(tokens) != expected:
        raise PreflightError(f"{cfg.data.uri} was ingested with {tokens} codes per image but model.image_size="
                             f"{cfg.model.image_size} uses {expected}; re-ingest or change model.image_size")
    ingest_cap = manifest.limits.get("max_text_tokens", {}).get("limit")
    if ingest_cap is not None and int(ingest_cap) > cfg.data.max_text_tokens:
        # The stream would stop the whole run at the first longer prompt, possibly hours in.
        raise PreflightError(f"{cfg.data.uri} holds prompts of up to {ingest_cap} tokens (its ingest's "
                             f"limits.max_text_tokens) but data.max_text_tokens={cfg.data.max_text_tokens}; "
                             f"set data.max_text_tokens={ingest_cap} or re-ingest with a lower limit")
    encoded_by = manifest.model
    if not cfg.model.weights and encoded_by.get("init_seed") is not None and int(encoded_by["init_seed"]) != cfg.train.seed:
        raise PreflightError(
            f"{cfg.data.uri} was VQ-encoded by the random-init {encoded_by.get('preset')} model with seed "
            f"{encoded_by['init_seed']}, but train.seed={cfg.train.seed} builds a different VQ tokenizer; "
            f"set train.seed={encoded_by['init_seed']} or re-ingest with init_seed={cfg.train.seed}")
    train_rows = manifest.split_rows("train")
    per_epoch = steps_per_epoch(train_rows, cfg.train.num_workers, cfg.train.micro_batch_size,
                                cfg.train.gradient_accumulation_steps)
    if per_epoch == 0:
        raise PreflightError(f"{train_rows} training rows are fewer than one global batch "
                             f"(train.global_batch_size={cfg.train.global_batch_size}); lower it or add data")
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    return manifest, per_epoch, total, manifest.split_rows("val")


def pin_registered_weights(cfg: ExperimentConfig) -> None:
    """`model.weights=models:/name@alias` becomes the version the alias points at now, so that
    every worker, every resume and the adapter this run may export name the same base.

    Raises:
        PreflightError: the registry does not have it.
    """
    from janus_lab.generation.loading import ModelSourceError, registered_version
    from janus_lab.tracking import resolve_tracking_uri

    if not (cfg.model.weights or "").startswith("models:/"):
        return
    from mlflow import MlflowClient

    try:
        version = registered_version(cfg.model.weights, MlflowClient(resolve_tracking_uri(cfg.tracking.tracking_uri)))
    except ModelSourceError as err:
        raise PreflightError(f"model.weights: {err}") from None
    if version.uri != cfg.model.weights:
        print(f"model.weights={cfg.model.weights} is {version.uri}: training on that version", flush=True)
        cfg.model.weights = version.uri


def dataset_layout(uri: str, manifest: DatasetManifest) -> DatasetLayout:
    """The dataset's row groups (what workers read), checked against its manifest's counts.

    Raises:
        PreflightError: the shards hold other rows than the manifest says.
    """
    layout = scan_layout(uri, manifest)
    for split in ("train", "val"):
        if layout.rows(split) != manifest.split_rows(split):
            raise PreflightError(f"{uri}: its shards hold {layout.rows(split)} {split} rows but its manifest says "
                                 f"{manifest.split_rows(split)}; the folder was changed after ingest: re-ingest it")
    return layout


def scaling_config(cfg: ExperimentConfig):
    """The Ray Train workers a config asks for: `train.num_workers`, one GPU each when `train.use_gpu`.

    The cluster manifests under infra/ are checked against this (tests/test_infra.py), so the
    GPUs a worker pod offers and the workers a run needs cannot drift apart.

    Returns:
        A `ray.train.ScalingConfig`.
    """
    import ray.train

    return ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu)


def run_finetune(cfg: ExperimentConfig, run: "RunLogger | None" = None, callbacks: Sequence = ()) -> FinetuneResult:
    """Runs fine-tuning on the Ray cluster this process is connected to.

    The MLflow run is opened here, on the driver, so that a worker group restarted after a
    failure keeps logging into the same run. A job submitted again with the same `name` and
    `train.storage_path` resumes from the checkpoints there (Ray Train's rule) and logs into the
    MLflow run of the submission that wrote them (tag `train_run_dir`), counting `resume_count`.

    Args:
        cfg: the experiment.
        run: an MLflow run to log into instead of opening one (a sweep trial's child run).
        callbacks: Ray Train callbacks (a sweep trial passes Tune's `TuneReportCallback`).

    Raises:
        S3UnavailableError: a worker gave up on S3 (its message whole, Ray Train's error as the
            cause); resubmitting once S3 is back resumes from the last registered checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from janus_lab.tracking import (GIT_COMMIT_TAG, RunLogger, check_tracking_server, find_run, git_commit,
                                    resolve_tracking_uri)

    manifest, per_epoch, total, val_rows = preflight(cfg)
    pin_registered_weights(cfg)
    layout = dataset_layout(cfg.data.uri, manifest)
    storage_path, storage_fs = ray_storage(cfg.train.storage_path, cfg.retry)
    run_dir = f"{cfg.train.storage_path.rstrip('/')}/{cfg.name}"
    export_uri = f"{run_dir}/export"

    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if run is None:
        # A sweep checked the server before its first trial; a trial starting while the server is
        # away waits for it through its run's logger instead of failing (docs/reliability.md).
        check_tracking_server(tracking_uri, error=PreflightError)
    tags = {GIT_COMMIT_TAG: git_commit(), "dataset_uri": cfg.data.uri,
            "dataset_fingerprint": str(manifest.model.get("fingerprint", "unknown")),
            "ray_train_run": cfg.name, RUN_DIR_TAG: run_dir}
    config_file = "config/resolved.yaml"
    previous = None
    if run is None and _has_checkpoints(f"{storage_path.rstrip('/')}/{cfg.name}", storage_fs):
        previous = find_run(tracking_uri, cfg.tracking.experiment, {RUN_DIR_TAG: run_dir})
    if previous is not None:
        # A job submitted again after a failure: Ray Train resumes from the run's checkpoints,
        # so the metrics go on in the run that logged the steps before them.
        logger = RunLogger.reopen(tracking_uri, previous.info.run_id)
        resumes = int(previous.data.tags.get(RESUME_COUNT_TAG, "0")) + 1
        changed = logger.log_new_params(flatten(cfg))
        logger.set_tags(tags | {RESUME_COUNT_TAG: resumes})
        if changed:
            logger.set_tags({f"resume_{resumes}.changed": "; ".join(
                f"{key}: {old} -> {new}" for key, (old, new) in changed.items())[:5000]})
        config_file = f"config/resume_{resumes}.yaml"
        print(f"{run_dir} has checkpoints: resuming, logging into MLflow run {logger.run_url()} "
              f"(resume {resumes}{', changed: ' + ', '.join(changed) if changed else ''})", flush=True)
    elif run is None:
        logger = RunLogger.open_run(tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name,
                                    params=flatten(cfg), tags=tags)
    else:
        logger = run
        logger.log_params(flatten(cfg))
        logger.set_tags(tags)
    from janus_lab.config import dump_yaml

    logger.log_text(dump_yaml(cfg), config_file)
    logger.log_text(manifest.to_json(), "dataset/_manifest.json")
    plan = LoopPlan(config=to_dict(cfg), steps_per_epoch=per_epoch, total_steps=total, val_rows=val_rows,
                    tracking_uri=tracking_uri, run_id=logger.run_id, export_uri=export_uri,
                    sample_prompts=list(DEFAULT_SAMPLE_PROMPTS), layout=layout,
                    dataset_fingerprint=manifest.model.get("fingerprint"))
    # No Ray Datasets: each worker reads its own part of every epoch (`janus_lab.data.stream`).
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.to_dict(),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": forwarded_env() | {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=list(callbacks),
        ),
    )
    print(f"fine-tuning {cfg.name}: {total} steps ({per_epoch} per epoch), {cfg.train.num_workers} workers, "
          f"MLflow run {logger.run_url()}", flush=True)
    try:
        result = trainer.fit()
    except Exception as error:
        logger.end("FAILED")
        drop_unregistered_checkpoints(f"{storage_path.rstrip('/')}/{cfg.name}", storage_fs)
        unavailable = worker_s3_failure(error)
        if unavailable is not None:
            raise S3UnavailableError(f"fine-tuning {cfg.name} failed: {unavailable}") from error
        raise
    logger.end("FINISHED")
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return FinetuneResult(run_name=cfg.name, checkpoint_path=checkpoint, export_uri=export_uri,
                          mlflow_run_id=logger.run_id, mlflow_url=logger.run_url(), metrics=result.metrics)


def worker_s3_failure(error: BaseException) -> S3UnavailableError | None:
    """The `S3UnavailableError` a Ray Train worker failed with, if any.

    Ray Train's message for a worker's failure keeps the first and last 500 characters of its
    traceback: an S3 error's head ("S3 unavailable uploading checkpoint s3://…") falls in the
    cut (docs/reliability.md). The worker's exception itself comes back whole in
    `worker_failures`, so the driver can raise it in full.
    """
    for failure in getattr(error, "worker_failures", {}).values():
        while failure is not None:
            if isinstance(failure, S3UnavailableError):
                return failure
            failure = failure.__cause__
    return None


CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints it registered (docs/platform-notes.md, "Ray Train")."""


def drop_unregistered_checkpoints(folder: str, storage_fs) -> list[str]:
    """Removes checkpoint folders of a failed run that Ray Train never registered.

    A checkpoint is complete once every rank has uploaded its part and Ray Train recorded the
    report; a rank that failed mid-upload (a full disk) can leave another rank's part behind,
    a folder that looks like a checkpoint and is not one. Ray Train would not resume from it,
    but a person or a tool listing the folder would. Best effort: a storage error is printed.

    Returns:
        The folder names removed.
    """
    import json

    from pyarrow import fs as pafs

    fs = storage_fs or pafs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        names = {info.base_name: info for info in infos}
        registered = set()
        if CHECKPOINT_SNAPSHOT in names:
            with fs.open_input_stream(f"{folder}/{CHECKPOINT_SNAPSHOT}") as stream:
                snapshot = json.loads(stream.read().decode())
            registered = {entry["checkpoint_dir_name"] for entry in snapshot.get("checkpoint_results", [])}
        partial = sorted(name for name, info in names.items()
                         if name.startswith("checkpoint_") and info.type == pafs.FileType.Directory
                         and name not in registered)
        for name in partial:
            fs.delete_dir(f"{folder}/{name}")
    except (OSError, ValueError, KeyError) as error:
        print(f"could not check {folder} for partial checkpoints: {error}", flush=True)
        return []
    if partial:
        print(f"removed partial checkpoints that Ray Train never registered: {', '.join(partial)}", flush=True)
    return partial


def _has_checkpoints(folder: str, storage_fs) -> bool:
    """Whether a run folder (in Ray Train's storage form, see `ray_storage`) holds checkpoints to resume."""
    if storage_fs is None:
        names = os.listdir(folder) if os.path.isdir(folder) else []
    else:
        from pyarrow import fs as pafs

        found = storage_fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        names = [info.base_name for info in found]
    return any(name.startswith("checkpoint_") for name in names)
