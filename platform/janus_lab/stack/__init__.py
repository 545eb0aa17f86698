"""The local stack: S3 (SeaweedFS), an MLflow tracking server and a Ray head on one machine.

    make up                       # python -m janus_lab.stack up   [--no-ray] [--run-dir DIR]
    make status                   # python -m janus_lab.stack status
    source run/stack/env.sh       # AWS_*, MLFLOW_*, RAY_* for clients in this shell
    make down                     # python -m janus_lab.stack down

- `services`: one class per service (SeaweedFS, MLflow, the Ray head) with its ports, command,
  readiness, health probe and the marker that proves a process is this stack's.
- `local`: `LocalStack`, the settings (ports from `JANUS_*` variables, see `ENV_OVERRIDES`) and
  the lifecycle, the same for every service.
- `processes`: finding and stopping a service's processes (psutil), free ports.
- `cli`: `python -m janus_lab.stack`.

Every service runs in its own process group (`start_new_session`). The group id goes to
`<run>/<service>.pid` and the output to `<run>/<service>.log`; `down` signals that group and
its descendants (SIGTERM, wait, then SIGKILL), so it never touches processes that belong to
someone else, such as the throwaway cluster of a test's `ray.init(address="local")`.

Ray keeps token authentication on (`services.RayHead`); `env()` exports `RAY_AUTH_MODE=token`
and `RAY_AUTH_TOKEN_PATH`, so `ray status`, `ray job submit`, `serve deploy` and
`ray.init(address=...)` work once `env.sh` is sourced.
"""

from janus_lab.stack.local import ENV_OVERRIDES, LocalStack, PortInUseError, PortSpec, ServiceStatus, default_run_dir
from janus_lab.stack.services import SERVICES as _SERVICES

SERVICES = tuple(service.name for service in _SERVICES)
"""Every service the stack can run, by name, in start order."""

__all__ = ["ENV_OVERRIDES", "LocalStack", "PortInUseError", "PortSpec", "SERVICES", "ServiceStatus", "default_run_dir"]
