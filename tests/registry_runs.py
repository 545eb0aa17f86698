"""Finished fine-tuning runs as `run_finetune` leaves them, for registry and serving tests.

A fine-tune costs minutes here, so tests log the run through the same `RunLogger`: tags
git_commit / dataset_uri / dataset_fingerprint, val_* metrics, and an `export_uri` tag naming a
real Hugging Face export (in S3 or a local folder).
"""

from __future__ import annotations

import uuid

from janus_lab.tracking import RunLogger


def make_run(tracking_uri: str, experiment: str, export_uri: str | None, val_nll: float,
             val_accuracy: float = 0.5) -> str:
    """Logs a finished run with two evaluations (the latest counts); returns its id."""
    logger = RunLogger.open_run(
        tracking_uri, experiment, f"run-{uuid.uuid4().hex[:6]}", params={"train.lr": 1e-2},
        tags={"git_commit": "0123abc", "dataset_uri": "s3://janus-lab/datasets/sample",
              "dataset_fingerprint": "fp-sample-1", "ray_train_run": "debug"})
    logger.log_metrics({"loss": 7.0, "val_nll": val_nll + 1, "val_accuracy": val_accuracy / 2}, step=4)
    logger.log_metrics({"loss": 6.0, "val_nll": val_nll, "val_accuracy": val_accuracy,
                        "val_t2i_nll": val_nll - 0.1}, step=8)
    if export_uri is not None:
        logger.set_tags({"export_uri": export_uri})
    logger.end()
    return logger.run_id
