"""Reaching the Ray cluster from a driver: what its workers must inherit, and one way to connect.

Ingest, fine-tuning and the sweeps all start Ray work from a driver. Workers of a cluster started
elsewhere do not see the driver shell's variables, so the ones that reach S3, MLflow and the
local model cache travel in the runtime env; inside `ray job submit` the job's own runtime env
already carries them to every worker, and repeating its variables is an error.
"""

from __future__ import annotations

import os

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
                 "JANUS_CACHE_DIR")
"""What a worker needs to reach S3 (credentials, endpoint, region), MLflow and the model cache."""


def forwarded_env() -> dict[str, str]:
    """The variables of `FORWARDED_ENV` this process has."""
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def in_submitted_job() -> bool:
    """Whether this process is the driver of a `ray job submit` job (Ray sets the variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def connect_ray() -> None:
    """Connects to the cluster once (`RAY_ADDRESS`, a submitted job's, or a new local one),
    forwarding `FORWARDED_ENV` unless the job's runtime env already does."""
    import ray

    if ray.is_initialized():
        return
    ray.init(runtime_env=None if in_submitted_job() else {"env_vars": forwarded_env()})


def ray_storage(uri: str, retry=None):
    """Ray Train's and Tune's `storage_path` and `storage_filesystem` for a local folder (an
    absolute path, no filesystem: Ray's default) or an `s3://` prefix (`bucket/key` and a pyarrow
    S3 filesystem configured from the environment, which Ray's own URI handling would not be).

    The S3 filesystem retries inside pyarrow for as long as `retry` (an `S3RetryConfig`) allows:
    Ray Train's controller writes its checkpoint record through it with no retry of its own,
    and one refused write during an S3 outage failed the whole run (docs/reliability.md).
    """
    from janus_lab.retry import sdk_retry_attempts
    from janus_lab.storage import is_s3_uri, pyarrow_filesystem, strip_scheme

    if is_s3_uri(uri):
        return strip_scheme(uri).rstrip("/"), pyarrow_filesystem(uri, sdk_retry_attempts(retry))[0]
    return os.path.abspath(uri), None
