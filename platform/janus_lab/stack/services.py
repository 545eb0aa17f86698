"""The stack's services, one class each: its ports, command, readiness, health probe and the
marker that proves a process is this stack's.

A new service is a new `Service` subclass in `SERVICES` (plus its port fields and on/off switch
on `LocalStack`, where users set them); start, wait, status, stop, free-port picking, the
`JANUS_*` variables and the port checks all follow from its declaration.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from janus_lab.stack.processes import tool

if TYPE_CHECKING:
    from janus_lab.stack.local import LocalStack


@dataclass(frozen=True)
class Port:
    """A port setting of `LocalStack` that a service binds."""

    setting: str
    """The `LocalStack` field, e.g. `s3_port`."""
    role: str
    """What it is for, in words (`PortInUseError` and `make status` show it)."""
    env_var: str
    """The `JANUS_*` variable that sets it."""
    grpc: bool = False
    """SeaweedFS: the gRPC twin listens on the same setting + 1 (its own default of +10000
    lands in Ray's worker port range, 10002-19999)."""


class Service:
    """One process (group) of the stack. Subclasses fill in the class attributes and methods."""

    name: str
    ports: tuple[Port, ...]
    switch: str | None = None
    """The `LocalStack` bool field that turns it on; None: always on."""
    shutdown_stages: tuple[Callable[[str], bool], ...] = (lambda name: True,)
    """Which processes (by command name) get SIGTERM in each stage of `down`."""

    def enabled(self, stack: LocalStack) -> bool:
        return self.switch is None or bool(getattr(stack, self.switch))

    def command(self, stack: LocalStack) -> list[str]:
        """The command line that starts it (writing whatever files it needs first)."""
        raise NotImplementedError

    def marker(self, stack: LocalStack) -> str:
        """A path inside this stack that one of its processes' command lines names. A PID file
        can outlive its processes (a reboot) and the id come back as an unrelated group; `down`
        must not kill that."""
        raise NotImplementedError

    def check(self, stack: LocalStack) -> None:
        """Raises until the service answers as ready."""
        raise NotImplementedError

    def healthy(self, stack: LocalStack) -> str:
        """What `status` says when `check` passes."""
        raise NotImplementedError

    def wait(self, stack: LocalStack) -> None:
        """Blocks until it is ready (from its launch), or raises."""
        stack.wait_until(self.name, lambda: self.check(stack))

    def probe(self, stack: LocalStack) -> tuple[bool, str]:
        """(healthy, in words) for `status`."""
        try:
            self.check(stack)
        except Exception as error:  # noqa: BLE001 - any failure is "unhealthy", in words
            return False, f"{self.unhealthy} {one_line(error)}"
        return True, self.healthy(stack)

    unhealthy = "check failed:"


class SeaweedFS(Service):
    """S3 gateway, master, volume server and filer in one `weed server`."""

    name = "seaweedfs"
    ports = (
        Port("s3_port", "s3", "JANUS_S3_PORT", grpc=True),
        Port("seaweedfs_master_port", "seaweedfs master", "JANUS_SEAWEEDFS_MASTER_PORT", grpc=True),
        Port("seaweedfs_volume_port", "seaweedfs volume", "JANUS_SEAWEEDFS_VOLUME_PORT", grpc=True),
        Port("seaweedfs_filer_port", "seaweedfs filer", "JANUS_SEAWEEDFS_FILER_PORT", grpc=True),
    )
    unhealthy = "bucket unreachable:"

    def marker(self, stack: LocalStack) -> str:
        return str(stack.run_dir / "seaweedfs")

    def command(self, stack: LocalStack) -> list[str]:
        data = stack.run_dir / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        identities = stack.run_dir / "s3-identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "janus-local",
            "credentials": [{"accessKey": stack.access_key, "secretKey": stack.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}, indent=2))
        m, v, f, s3 = stack.seaweedfs_master_port, stack.seaweedfs_volume_port, stack.seaweedfs_filer_port, stack.s3_port
        return [
            tool("weed"), "server",
            f"-ip={stack.host}", f"-ip.bind={stack.host}", f"-dir={data}",
            f"-master.port={m}", f"-master.port.grpc={m + 1}",
            f"-volume.port={v}", f"-volume.port.grpc={v + 1}",
            "-filer", f"-filer.port={f}", f"-filer.port.grpc={f + 1}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 1}",
            f"-s3.config={identities}",
            # The S3 gateway also opens an Iceberg catalog (8181) and a Lance namespace (9101)
            # by default: fixed ports that clash with any other `weed server` on the machine.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # One master: a restart otherwise waits a 10 s election timeout before S3 answers.
            "-master.electionTimeout=2s",
            # 1 GiB volumes, as many as the disk holds. With the default (at most 8 volumes)
            # each bucket grabs 7 on its first write and a third bucket's writes fail with
            # InternalError ("no free volumes").
            "-master.volumeSizeLimitMB=1024", "-volume.max=0",
            # No load balancer to drain from; stopping need not wait.
            "-volume.preStopSeconds=0",
        ]  # fmt: skip

    def check(self, stack: LocalStack) -> None:
        # Ready means the bucket exists: S3 answers a few hundred ms before the filer behind it
        # accepts writes, so creating the bucket is retried until it works.
        from botocore.exceptions import ClientError

        try:
            s3_client(stack).create_bucket(Bucket=stack.bucket)
        except ClientError as error:
            if error.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def probe(self, stack: LocalStack) -> tuple[bool, str]:
        # Status only looks: a stack whose bucket was deleted reports it rather than recreating it.
        try:
            s3_client(stack).head_bucket(Bucket=stack.bucket)
        except Exception as error:  # noqa: BLE001
            return False, f"bucket {stack.bucket} unreachable: {one_line(error)}"
        return True, self.healthy(stack)

    def healthy(self, stack: LocalStack) -> str:
        return f"bucket {stack.bucket} ok at {stack.s3_endpoint}"


class MLflow(Service):
    """The tracking server: SQLite under the run folder, artifacts in the stack's bucket."""

    name = "mlflow"
    ports = (Port("mlflow_port", "mlflow", "JANUS_MLFLOW_PORT"),)
    switch = "with_mlflow"
    unhealthy = "/health failed:"

    def marker(self, stack: LocalStack) -> str:
        return str(stack.run_dir / "mlflow.db")

    def command(self, stack: LocalStack) -> list[str]:
        return [
            tool("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{stack.run_dir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{stack.bucket}/mlflow",
            "--host", stack.host, "--port", str(stack.mlflow_port),
            "--workers", "1",
        ]  # fmt: skip

    def check(self, stack: LocalStack) -> None:
        http_get(f"{stack.mlflow_tracking_uri}/health")

    def healthy(self, stack: LocalStack) -> str:
        return f"/health ok at {stack.mlflow_tracking_uri}"


# Ray's Unix sockets live under <temp dir>/session_<date>_<pid>/sockets/, and a socket path may
# not exceed 107 bytes; past this length the temp dir moves to a short path under /tmp.
_MAX_RAY_TEMP_DIR_LEN = 40


class RayHead(Service):
    """`ray start --head` with token authentication: its GCS listens on every interface
    whatever `--node-ip-address` says, so "local only" would not hold without a token."""

    name = "ray"
    ports = (
        Port("ray_port", "ray gcs", "JANUS_RAY_PORT"),
        Port("ray_dashboard_port", "ray dashboard", "JANUS_RAY_DASHBOARD_PORT"),
        Port("ray_client_port", "ray client server", "JANUS_RAY_CLIENT_PORT"),
        Port("ray_dashboard_agent_port", "ray dashboard agent", "JANUS_RAY_AGENT_PORT"),
    )
    switch = "with_ray"
    # As `ray stop` does it: the raylet first (agents fate-share with it), the GCS last. SIGTERM
    # to everything at once left gcs_server running for minutes here.
    shutdown_stages = (
        lambda name: name == "raylet",
        lambda name: name != "gcs_server",
        lambda name: True,
    )
    unhealthy = "gcs health check failed:"

    @staticmethod
    def temp_dir(stack: LocalStack) -> Path:
        inside = stack.run_dir / "ray"
        if len(str(inside)) <= _MAX_RAY_TEMP_DIR_LEN:
            return inside
        return Path(tempfile.gettempdir()) / f"janus-ray-{stack.ray_port}"

    @staticmethod
    def auth_env(stack: LocalStack) -> dict[str, str]:
        """The token lives in the run folder rather than `~/.ray/auth_token` (whose mere presence
        flips later `ray start` calls into token mode)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(stack.ray_token_path)}

    def client_env(self, stack: LocalStack) -> dict[str, str]:
        """What `ray status`, `ray job submit`, `serve deploy` and `ray.init(address=...)` need."""
        return {
            "RAY_ADDRESS": stack.ray_address,
            # `ray job submit` reads the first, `serve deploy` the second.
            "RAY_API_SERVER_ADDRESS": stack.ray_dashboard_url,
            "RAY_DASHBOARD_ADDRESS": stack.ray_dashboard_url,
            **self.auth_env(stack),
        }

    def marker(self, stack: LocalStack) -> str:
        return str(self.temp_dir(stack))

    def command(self, stack: LocalStack) -> list[str]:
        if not stack.ray_token_path.exists():
            # 0600 from the start: the token is the cluster's only access control.
            fd = os.open(stack.ray_token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as token_file:
                token_file.write(secrets.token_hex(32))
        # `ray start` daemonises and exits; the daemons stay in its process group, whose id
        # (the pid of `ray start`) is what ray.pid records.
        return [
            tool("ray"), "start", "--head",
            "--node-ip-address", stack.host,
            "--port", str(stack.ray_port),
            "--num-cpus", str(stack.ray_num_cpus),
            "--dashboard-host", stack.host,
            "--dashboard-port", str(stack.ray_dashboard_port),
            "--ray-client-server-port", str(stack.ray_client_port),
            "--dashboard-agent-listen-port", str(stack.ray_dashboard_agent_port),
            # Own temp dir: logs stay with the stack, and a bare ray.init() elsewhere on the
            # machine does not find this cluster through /tmp/ray/ray_current_cluster.
            "--temp-dir", str(self.temp_dir(stack)),
            "--disable-usage-stats",
        ]  # fmt: skip

    def wait(self, stack: LocalStack) -> None:
        started = stack.launched_at(self.name)
        launcher = stack.launcher(self.name)
        log = stack.log_file(self.name)
        if launcher is not None:
            try:
                code = launcher.wait(timeout=max(1.0, stack.start_timeout_s - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"`ray start` did not finish in {stack.start_timeout_s:.0f}s; see {log}") from None
            if code != 0:
                raise RuntimeError(f"`ray start` exited with code {code}; last lines of {log}:\n{tail(log)}")
        # The dashboard (job API) answers a moment after `ray start` returns. `ray start` has
        # exited by now (its daemons live on), so there is no process to watch.
        stack.wait_until(self.name, lambda: self.check(stack), watch_process=False)

    def check(self, stack: LocalStack) -> None:
        # /api/gcs_healthz is exempt from token auth, so status needs no token.
        http_get(f"{stack.ray_dashboard_url}/api/gcs_healthz")

    def healthy(self, stack: LocalStack) -> str:
        return f"gcs ok, dashboard {stack.ray_dashboard_url}"


SERVICES: tuple[Service, ...] = (SeaweedFS(), MLflow(), RayHead())
"""Every service the stack can run, in start order."""

SERVICE = {service.name: service for service in SERVICES}
RAY = SERVICE["ray"]


def s3_client(stack: LocalStack):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.access_key,
        aws_secret_access_key=stack.secret_key, region_name=stack.region,
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.read().decode(errors="replace")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def one_line(error: BaseException | None) -> str:
    import urllib.error

    if error is None:
        return "none"
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
