"""The local stack: S3 (SeaweedFS), an MLflow tracking server and a Ray head on one machine.

    make up                       # python -m janus_lab.stack up   [--no-ray] [--run-dir DIR]
    make status                   # python -m janus_lab.stack status
    source run/stack/env.sh       # AWS_*, MLFLOW_*, RAY_* for clients in this shell
    make down                     # python -m janus_lab.stack down

Every service runs in its own process group (``start_new_session``). The group id goes to
``<run>/<service>.pid`` and the output to ``<run>/<service>.log``; ``down`` signals that group
(SIGTERM, wait, then SIGKILL), so it never touches processes that belong to someone else, such
as the throwaway cluster of a test's ``ray.init(address="local")``.

Ports come from the dataclass defaults, overridable with ``JANUS_*`` variables (see
``ENV_OVERRIDES``). SeaweedFS's gRPC ports are each service's HTTP port + 1: its own default of
+10000 lands in Ray's worker port range (10002-19999).

Ray keeps token authentication on. Its GCS listens on every interface whatever ``--node-ip-address``
says, so "local only" would not hold without a token. The token lives in ``<run>/ray_auth_token``
rather than ``~/.ray/auth_token`` (whose mere presence flips later ``ray start`` calls into token
mode); ``env()`` exports ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` so ``ray status``,
``ray job submit``, ``serve deploy`` and ``ray.init(address=...)`` work once ``env.sh`` is sourced.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("seaweedfs", "mlflow", "ray")
"""Every service the stack can run, in start order."""

ENV_OVERRIDES = {
    "JANUS_STACK_DIR": "run_dir",
    "JANUS_S3_PORT": "s3_port",
    "JANUS_SEAWEEDFS_MASTER_PORT": "seaweedfs_master_port",
    "JANUS_SEAWEEDFS_VOLUME_PORT": "seaweedfs_volume_port",
    "JANUS_SEAWEEDFS_FILER_PORT": "seaweedfs_filer_port",
    "JANUS_MLFLOW_PORT": "mlflow_port",
    "JANUS_RAY_PORT": "ray_port",
    "JANUS_RAY_DASHBOARD_PORT": "ray_dashboard_port",
    "JANUS_RAY_CLIENT_PORT": "ray_client_port",
    "JANUS_RAY_AGENT_PORT": "ray_dashboard_agent_port",
    "JANUS_BUCKET": "bucket",
}
"""Environment variable -> LocalStack field, read by ``LocalStack.from_env``."""

_ENV_VAR_OF_FIELD = {name: var for var, name in ENV_OVERRIDES.items()}

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The repo root when the package is installed in place (`pip install -e .`)."""

# S3 bucket naming rules; SeaweedFS rejects the rest (e.g. one-letter names) at create time.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# Ray's Unix sockets live under <temp dir>/session_<date>_<pid>/sockets/, and a socket path may
# not exceed 107 bytes; past this length the temp dir moves to a short path under /tmp.
_MAX_RAY_TEMP_DIR_LEN = 40

# Shutdown order inside the Ray head's process group, as `ray stop` does it: the raylet first
# (agents fate-share with it), the GCS last. SIGTERM to everything at once left gcs_server
# running for minutes here. Other services stop in a single stage.
_RAY_SHUTDOWN_STAGES: tuple[Callable[[str], bool], ...] = (
    lambda comm: comm == "raylet",
    lambda comm: comm != "gcs_server",
    lambda comm: True,
)


class PortInUseError(RuntimeError):
    """A port the stack needs is already taken by another process.

    Attributes:
        port: The busy port.
        role: What the stack wanted it for, e.g. ``"s3"`` or ``"ray gcs"``.
    """

    def __init__(self, port: int, role: str, hint: str):
        self.port = port
        self.role = role
        super().__init__(
            f"port {port} for {role} is already in use; {hint}, or stop whatever holds it "
            f"(another stack? run `make status`)"
        )


@dataclass(frozen=True)
class PortSpec:
    """One port a service binds, and how a user moves it."""

    role: str
    """What the port is for, e.g. ``"seaweedfs master gRPC"``."""
    port: int
    """The port number."""
    hint: str
    """How to change it, quoted in ``PortInUseError``."""


@dataclass(frozen=True)
class ServiceStatus:
    """What ``LocalStack.status`` knows about one service."""

    name: str
    """Service name: one of ``SERVICES``."""
    up: bool
    """True when its processes are alive and its health check passes."""
    pid: int | None
    """Process group id from the PID file (None when not running)."""
    processes: int
    """Live processes in that group (Ray's head runs a dozen)."""
    ports: dict[str, int]
    """Role -> port."""
    health: str
    """Outcome of the health check, in words."""


def default_run_dir() -> Path:
    """``<repo>/run/stack`` for a source checkout, ``./run/stack`` for an installed package."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "pyproject.toml").is_file():
        repo = Path.cwd()
    return repo / "run" / "stack"


@dataclass
class LocalStack:
    """S3 + MLflow + Ray head for one machine, started as subprocesses under ``run_dir``.

    Example:
        stack = LocalStack(with_ray=False)
        stack.up()
        os.environ.update(stack.env())
        ...
        stack.down()
    """

    run_dir: Path = field(default_factory=default_run_dir)
    """Folder for data (SeaweedFS volumes, MLflow's SQLite), logs, PID files and env.sh."""
    host: str = "127.0.0.1"
    """Address the services bind to and clients use; loopback only (the credentials are fixed)."""
    s3_port: int = 8333
    """SeaweedFS S3 gateway (HTTP); its gRPC port is this + 1."""
    seaweedfs_master_port: int = 9340
    """SeaweedFS master (HTTP); gRPC on +1. Not 9333, so a default `weed server` can coexist."""
    seaweedfs_volume_port: int = 9342
    """SeaweedFS volume server (HTTP); gRPC on +1. Not 8080, which half the world uses."""
    seaweedfs_filer_port: int = 9344
    """SeaweedFS filer (HTTP); gRPC on +1. Not 8888 (Jupyter)."""
    mlflow_port: int = 5000
    """MLflow tracking server."""
    ray_port: int = 6379
    """Ray GCS (the head's address)."""
    ray_dashboard_port: int = 8265
    """Ray dashboard, also the job submission API."""
    ray_client_port: int = 10001
    """Ray client server (``ray://`` addresses)."""
    ray_dashboard_agent_port: int = 52375
    """Ray dashboard agent (HTTP). Not Ray's default 52365: any other Ray cluster on the machine
    (a test's ``ray.init(address="local")``) takes that one, and an agent that cannot bind makes
    ``ray job submit`` fail with "No available agent to submit job"."""
    bucket: str = "janus-lab"
    """Bucket created at start; MLflow artifacts go under ``s3://<bucket>/mlflow``."""
    access_key: str = "janus-local"
    """S3 access key. Local-only credentials, not a secret."""
    secret_key: str = "janus-local-secret"
    """S3 secret key. Local-only credentials, not a secret."""
    region: str = "us-east-1"
    """Region clients sign requests for (SeaweedFS accepts any)."""
    ray_num_cpus: int = 4
    """Logical CPUs of the Ray head. More than the cores on purpose: with 2, Ray Data's read
    tasks starve next to two 1-CPU train workers and the job hangs."""
    with_mlflow: bool = True
    """Run the MLflow tracking server."""
    with_ray: bool = True
    """Run a Ray head. Tests leave it off and use ``ray.init(address="local")``."""
    start_timeout_s: float = 180.0
    """Longest wait for one service to become ready (Ray needs ~15 s idle, ~60 s on a busy box)."""
    stop_timeout_s: float = 30.0
    """Wait after SIGTERM before SIGKILL. SeaweedFS needs ~15 s: its filer drains gRPC streams."""
    verbose: bool = True
    """Print progress lines."""

    _processes: dict[str, subprocess.Popen] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _launched_at: dict[str, float] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Absolute, because it ends up in a sqlite:/// URI and in Ray's --temp-dir.
        self.run_dir = Path(self.run_dir).expanduser().resolve()
        if not _is_loopback(self.host):
            # The S3 keys below are written in this repository and MLflow asks for none: on any
            # other interface, anyone on the network could read and overwrite runs and models.
            raise ValueError(f"host {self.host!r} is not a loopback address: the local stack's S3 "
                             f"credentials are fixed and public and its MLflow has no login, so it only "
                             f"binds to 127.0.0.1, ::1 or localhost; a shared deployment is infra/")
        if not _BUCKET_NAME.match(self.bucket):
            raise ValueError(f"bucket {self.bucket!r} is not a valid S3 bucket name")
        if self.ray_num_cpus < 1:
            raise ValueError(f"ray_num_cpus must be >= 1, got {self.ray_num_cpus}")
        if self.start_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("start_timeout_s and stop_timeout_s must be > 0")
        seen: dict[int, str] = {}
        for service in SERVICES:
            for spec in self.ports(service):
                if not 0 < spec.port < 65536:
                    raise ValueError(f"port {spec.port} for {spec.role} is out of range")
                if spec.port in seen:
                    raise ValueError(
                        f"port {spec.port} is configured for both {seen[spec.port]} and {spec.role}"
                    )
                seen[spec.port] = spec.role

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> LocalStack:
        """Builds a stack from the defaults, ``JANUS_*`` variables, then explicit overrides.

        Args:
            environ: Where to read the variables (default ``os.environ``).
            **overrides: Field values that win over the environment (None values are ignored).

        Returns:
            The configured, not yet started, stack.

        Raises:
            ValueError: A ``JANUS_*_PORT`` variable is not an integer.
        """
        environ = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        for var, name in ENV_OVERRIDES.items():
            value = environ.get(var)
            if not value:
                continue
            if name.endswith("_port"):
                try:
                    kwargs[name] = int(value)
                except ValueError:
                    raise ValueError(f"{var}={value!r} is not a port number") from None
            else:
                kwargs[name] = value
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    @classmethod
    def for_run_dir(cls, run_dir: Path | None = None, **overrides) -> LocalStack:
        """The stack recorded in ``run_dir`` if any of its services runs, else ``from_env``.

        ``up`` records its configuration in ``<run>/stack.json``, so ``status`` and a second
        ``up`` see the ports actually in use even from a shell without the ``JANUS_*`` variables.

        Args:
            run_dir: The run folder (default: ``JANUS_STACK_DIR`` or ``<repo>/run/stack``).
            **overrides: Fields that win over both (e.g. ``with_ray``).

        Returns:
            The configured stack.
        """
        fresh = cls.from_env(run_dir=run_dir, **overrides)
        recorded = fresh.run_dir / "stack.json"
        if not recorded.is_file() or not any(fresh._group_of(s) for s in SERVICES):
            return fresh
        saved = json.loads(recorded.read_text())
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        saved = {k: v for k, v in saved.items() if k in known}
        saved.update({k: v for k, v in overrides.items() if v is not None})
        saved["run_dir"] = fresh.run_dir
        return cls(**saved)

    @classmethod
    def with_free_ports(cls, run_dir: Path, **overrides) -> LocalStack:
        """A stack on ports that are free right now, so it never clashes with ``make up``.

        Each SeaweedFS port is picked together with its +1 (gRPC) neighbour. The ports are held
        while picking (no duplicates) and released on return, so start the stack soon after.

        Args:
            run_dir: The run folder.
            **overrides: Other fields.

        Returns:
            The configured stack.
        """
        held: list[socket.socket] = []
        try:
            paired = [_reserve_port(held, pair=True) for _ in range(4)]
            single = [_reserve_port(held, pair=False) for _ in range(5)]
        finally:
            for sock in held:
                sock.close()
        ports = dict(
            s3_port=paired[0],
            seaweedfs_master_port=paired[1],
            seaweedfs_volume_port=paired[2],
            seaweedfs_filer_port=paired[3],
            mlflow_port=single[0],
            ray_port=single[1],
            ray_dashboard_port=single[2],
            ray_client_port=single[3],
            ray_dashboard_agent_port=single[4],
        )
        return cls(run_dir=run_dir, **{**ports, **overrides})

    # ----------------------------------------------------------------- addresses

    @property
    def s3_endpoint(self) -> str:
        """S3 endpoint URL for clients."""
        return f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_tracking_uri(self) -> str:
        """MLflow tracking URI for clients."""
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        """Ray GCS address (``RAY_ADDRESS``)."""
        return f"{self.host}:{self.ray_port}"

    @property
    def ray_dashboard_url(self) -> str:
        """Ray dashboard / job submission URL."""
        return f"http://{self.host}:{self.ray_dashboard_port}"

    @property
    def ray_token_path(self) -> Path:
        """File holding this stack's Ray auth token."""
        return self.run_dir / "ray_auth_token"

    @property
    def env_file(self) -> Path:
        """``env.sh`` written by ``up``."""
        return self.run_dir / "env.sh"

    def pid_file(self, service: str) -> Path:
        """``<run>/<service>.pid``: the service's process group id."""
        return self.run_dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        """``<run>/<service>.log``: the service's stdout and stderr."""
        return self.run_dir / f"{service}.log"

    def enabled(self) -> list[str]:
        """The services this configuration runs, in start order."""
        on = {"seaweedfs": True, "mlflow": self.with_mlflow, "ray": self.with_ray}
        return [s for s in SERVICES if on[s]]

    def ports(self, service: str) -> list[PortSpec]:
        """Every port ``service`` binds, with the setting that moves it.

        Args:
            service: One of ``SERVICES``.

        Returns:
            The port specs, main port first.
        """

        def spec(role: str, name: str, plus_one: bool = False) -> PortSpec:
            port = getattr(self, name) + (1 if plus_one else 0)
            where = f"set {_ENV_VAR_OF_FIELD[name]} or LocalStack({name}=...)"
            if plus_one:
                where += f" (gRPC uses {name} + 1)"
            return PortSpec(role, port, where)

        if service == "seaweedfs":
            return [
                spec("s3", "s3_port"),
                spec("s3 gRPC", "s3_port", plus_one=True),
                spec("seaweedfs master", "seaweedfs_master_port"),
                spec("seaweedfs master gRPC", "seaweedfs_master_port", plus_one=True),
                spec("seaweedfs volume", "seaweedfs_volume_port"),
                spec("seaweedfs volume gRPC", "seaweedfs_volume_port", plus_one=True),
                spec("seaweedfs filer", "seaweedfs_filer_port"),
                spec("seaweedfs filer gRPC", "seaweedfs_filer_port", plus_one=True),
            ]
        if service == "mlflow":
            return [spec("mlflow", "mlflow_port")]
        if service == "ray":
            return [
                spec("ray gcs", "ray_port"),
                spec("ray dashboard", "ray_dashboard_port"),
                spec("ray client server", "ray_client_port"),
                spec("ray dashboard agent", "ray_dashboard_agent_port"),
            ]
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")

    # ----------------------------------------------------------------- client environment

    def env(self) -> dict[str, str]:
        """The environment a client needs to use this stack.

        pyarrow, s3fs, boto3 and Ray Data read the ``AWS_*`` variables; MLflow clients need only
        the tracking URI (artifacts go through the server). Ray variables appear only while the
        Ray head runs.

        Returns:
            Variable -> value.
        """
        env = self._storage_env()
        if self.with_ray and self._group_of("ray"):
            env.update(
                RAY_ADDRESS=self.ray_address,
                # `ray job submit` reads the first, `serve deploy` the second.
                RAY_API_SERVER_ADDRESS=self.ray_dashboard_url,
                RAY_DASHBOARD_ADDRESS=self.ray_dashboard_url,
                **self._ray_auth_env(),
            )
        return env

    def _storage_env(self) -> dict[str, str]:
        """The S3 and MLflow part of ``env()``."""
        env = {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "JANUS_BUCKET": self.bucket,
        }
        if self.with_mlflow:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_tracking_uri
        return env

    def write_env_file(self) -> Path:
        """Writes ``env()`` as export lines to ``<run>/env.sh``.

        Returns:
            The file's path.
        """
        lines = [
            "# Client environment of the janus-lab local stack; written by"
            " `python -m janus_lab.stack up`.",
            f"# Use it with: source {self.env_file}",
        ]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        self.env_file.write_text("\n".join(lines) + "\n")
        return self.env_file

    # ----------------------------------------------------------------- lifecycle

    def up(self) -> LocalStack:
        """Starts every enabled service that is not already running and waits until all are ready.

        Idempotent: a running service is reported and left alone. All ports are checked before
        anything starts. If a service fails, the ones this call started are stopped again.

        Returns:
            self, so ``stack = LocalStack(...).up()`` reads naturally.

        Raises:
            PortInUseError: A port is taken (nothing was started).
            RuntimeError: A service exited while starting (its log tail is in the message).
            TimeoutError: A service did not become ready within ``start_timeout_s``.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wanted = self.enabled()
        to_start = []
        for service in wanted:
            group = self._group_of(service)
            if group:
                self._say(f"{service} already running (pid {group})")
            else:
                to_start.append(service)
        for service in to_start:
            self._check_ports_free(service)

        started: list[str] = []
        try:
            # Launch everything first, then wait: MLflow and Ray do not need S3 to boot, and the
            # three starts overlap instead of adding up.
            for service in to_start:
                getattr(self, f"_launch_{service}")()
                started.append(service)
            for service in wanted:
                getattr(self, f"_wait_{service}")()
        except BaseException:
            if started:
                self._say(f"start failed; stopping {', '.join(started)}")
                self._stop_all(started, timeout_s=5.0)
            raise
        self._save_config()
        self.write_env_file()
        self._say(f"stack ready; client environment: source {self.env_file}")
        return self

    def down(self, timeout_s: float | None = None) -> list[str]:
        """Stops every service that has a PID file, all at once, and removes the PID files.

        Args:
            timeout_s: Wait after SIGTERM before SIGKILL (default ``stop_timeout_s``). Throwaway
                stacks (tests) pass a few seconds rather than wait out SeaweedFS's drain.

        Returns:
            The services that were running.
        """
        running = [s for s in SERVICES if self.pid_file(s).exists()]
        stopped = self._stop_all(running, timeout_s or self.stop_timeout_s)
        self.env_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ServiceStatus]:
        """Reports each enabled service: alive or not, PID, ports and a health check.

        Returns:
            One ``ServiceStatus`` per enabled service.
        """
        report = []
        for service in self.enabled():
            group = self._group_of(service)
            processes = len(self._processes_of(service, group)) if group else 0
            ports = {spec.role: spec.port for spec in self.ports(service)}
            if not group:
                report.append(ServiceStatus(service, False, None, 0, ports, "not running"))
                continue
            healthy, health = getattr(self, f"_probe_{service}")()
            report.append(ServiceStatus(service, healthy, group, processes, ports, health))
        return report

    # ----------------------------------------------------------------- SeaweedFS

    def _launch_seaweedfs(self) -> None:
        data = self.run_dir / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.run_dir / "s3-identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "janus-local",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                indent=2,
            )
        )
        m, v, f = self.seaweedfs_master_port, self.seaweedfs_volume_port, self.seaweedfs_filer_port
        command = [
            _tool("weed"), "server",
            f"-ip={self.host}", f"-ip.bind={self.host}", f"-dir={data}",
            f"-master.port={m}", f"-master.port.grpc={m + 1}",
            f"-volume.port={v}", f"-volume.port.grpc={v + 1}",
            "-filer", f"-filer.port={f}", f"-filer.port.grpc={f + 1}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={self.s3_port + 1}",
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
        self._spawn("seaweedfs", command)

    def _wait_seaweedfs(self) -> None:
        # Ready means the bucket exists: S3 answers a few hundred ms before the filer behind it
        # accepts writes, so creating the bucket is retried until it works.
        self._say(f"waiting for s3 on {self.host}:{self.s3_port} ...", end=" ")
        self._wait_until("seaweedfs", self._ensure_bucket)

    def _s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        s3 = self._s3_client()
        try:
            s3.create_bucket(Bucket=self.bucket)
        except ClientError as error:
            if error.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise

    def _probe_seaweedfs(self) -> tuple[bool, str]:
        try:
            self._s3_client().head_bucket(Bucket=self.bucket)
        except Exception as error:  # noqa: BLE001 - any failure is "unhealthy", in words
            return False, f"bucket {self.bucket} unreachable: {_one_line(error)}"
        return True, f"bucket {self.bucket} ok at {self.s3_endpoint}"

    # ----------------------------------------------------------------- MLflow

    def _launch_mlflow(self) -> None:
        command = [
            _tool("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{self.run_dir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{self.bucket}/mlflow",
            "--host", self.host, "--port", str(self.mlflow_port),
            "--workers", "1",
        ]  # fmt: skip
        self._spawn("mlflow", command)

    def _wait_mlflow(self) -> None:
        self._say(f"waiting for mlflow on {self.host}:{self.mlflow_port} ...", end=" ")
        self._wait_until("mlflow", self._check_mlflow_health)

    def _check_mlflow_health(self) -> None:
        _http_get(f"{self.mlflow_tracking_uri}/health")

    def _probe_mlflow(self) -> tuple[bool, str]:
        try:
            self._check_mlflow_health()
        except Exception as error:  # noqa: BLE001
            return False, f"/health failed: {_one_line(error)}"
        return True, f"/health ok at {self.mlflow_tracking_uri}"

    # ----------------------------------------------------------------- Ray

    def _ray_auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path)}

    def _ray_temp_dir(self) -> Path:
        inside = self.run_dir / "ray"
        if len(str(inside)) <= _MAX_RAY_TEMP_DIR_LEN:
            return inside
        return Path(tempfile.gettempdir()) / f"janus-ray-{self.ray_port}"

    def _launch_ray(self) -> None:
        if not self.ray_token_path.exists():
            # 0600 from the start: the token is the cluster's only access control.
            fd = os.open(self.ray_token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as token_file:
                token_file.write(secrets.token_hex(32))
        command = [
            _tool("ray"), "start", "--head",
            "--node-ip-address", self.host,
            "--port", str(self.ray_port),
            "--num-cpus", str(self.ray_num_cpus),
            "--dashboard-host", self.host,
            "--dashboard-port", str(self.ray_dashboard_port),
            "--ray-client-server-port", str(self.ray_client_port),
            "--dashboard-agent-listen-port", str(self.ray_dashboard_agent_port),
            # Own temp dir: logs stay with the stack, and a bare ray.init() elsewhere on the
            # machine does not find this cluster through /tmp/ray/ray_current_cluster.
            "--temp-dir", str(self._ray_temp_dir()),
            "--disable-usage-stats",
        ]  # fmt: skip
        # `ray start` daemonises and exits; the daemons stay in its process group, whose id
        # (the pid of `ray start`) is what ray.pid records.
        self._spawn("ray", command)

    def _wait_ray(self) -> None:
        started = self._launched_at.get("ray", time.monotonic())
        self._say(f"waiting for ray head on {self.ray_address} ...", end=" ")
        launcher = self._processes.get("ray")
        if launcher is not None:
            remaining = max(1.0, self.start_timeout_s - (time.monotonic() - started))
            try:
                code = launcher.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                self._say("timed out")
                raise TimeoutError(
                    f"`ray start` did not finish in {self.start_timeout_s:.0f}s; "
                    f"see {self.log_file('ray')}"
                ) from None
            if code != 0:
                self._say("failed")
                raise RuntimeError(
                    f"`ray start` exited with code {code}; last lines of "
                    f"{self.log_file('ray')}:\n{_tail(self.log_file('ray'))}"
                )
        # The dashboard (job API) answers a moment after `ray start` returns. `ray start` has
        # exited by now (its daemons live on), so there is no process to watch.
        self._wait_until("ray", self._check_ray_health, started=started, watch_process=False)

    def _check_ray_health(self) -> None:
        # /api/gcs_healthz is exempt from token auth, so status needs no token.
        _http_get(f"{self.ray_dashboard_url}/api/gcs_healthz")

    def _probe_ray(self) -> tuple[bool, str]:
        try:
            self._check_ray_health()
        except Exception as error:  # noqa: BLE001
            return False, f"gcs health check failed: {_one_line(error)}"
        return True, f"gcs ok, dashboard {self.ray_dashboard_url}"

    # ----------------------------------------------------------------- processes

    def _service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # A sourced env.sh of some stack must not make `ray start --head` join that cluster.
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
            env.pop(var, None)
        # Tools next to this interpreter come first: Ray job entrypoints run `python` from the
        # raylet's PATH, which otherwise finds the system Python without ray installed.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        # Services get the storage environment too: Ray workers and job drivers inherit the
        # raylet's, so jobs reach S3 and MLflow without a runtime_env; MLflow writes artifacts.
        env.update(self._storage_env())
        # The project root on the path: `serve deploy serve/config.yaml` names `serve.app:build`,
        # which Serve's controller imports on the cluster without a working_dir.
        if (_PROJECT_ROOT / "serve" / "app.py").exists():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # ~490 MB instead of ~1.7 GB
            MLFLOW_DISABLE_TELEMETRY="true",
            **self._ray_auth_env(),
        )
        return env

    def _spawn(self, service: str, command: list[str]) -> None:
        log_path = self.log_file(service)
        with open(log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                env=self._service_env(),
                # Own process group: `down` signals exactly this service's processes, and
                # Ctrl-C in the terminal that ran `make up` does not reach them.
                start_new_session=True,
            )
        self._processes[service] = process
        self._launched_at[service] = time.monotonic()
        self.pid_file(service).write_text(f"{process.pid}\n")
        self._say(f"started {service} (pid {process.pid}, log {log_path})")

    def _wait_until(
        self,
        service: str,
        check: Callable[[], None],
        started: float | None = None,
        watch_process: bool = True,
    ) -> None:
        """Calls ``check`` until it stops raising, the process dies, or time runs out.

        The time counts from the service's launch, so "ready in" is its real start-up time.
        """
        if started is None:
            started = self._launched_at.get(service, time.monotonic())
        process = self._processes.get(service) if watch_process else None
        last_error: Exception | None = None
        while True:
            try:
                check()
                self._say(f"ready in {time.monotonic() - started:.1f}s")
                return
            except Exception as error:  # noqa: BLE001 - not ready yet, keep the reason
                last_error = error
            if process is not None and process.poll() is not None:
                self._say("failed")
                raise RuntimeError(
                    f"{service} exited with code {process.returncode} while starting; last "
                    f"lines of {self.log_file(service)}:\n{_tail(self.log_file(service))}"
                )
            if time.monotonic() - started > self.start_timeout_s:
                self._say("timed out")
                raise TimeoutError(
                    f"{service} not ready after {self.start_timeout_s:.0f}s "
                    f"(last error: {_one_line(last_error)}); see {self.log_file(service)}"
                )
            time.sleep(0.25)

    def _group_of(self, service: str) -> int | None:
        """The service's process group id if any of its processes is alive, else None."""
        path = self.pid_file(service)
        try:
            group = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return group if self._processes_of(service, group) else None

    def _processes_of(self, service: str, group: int) -> dict[int, str]:
        """Live processes of ``group`` (and descendants), if they belong to this service.

        A PID file can outlive its processes (a reboot, a killed machine), and the id can come
        back as some unrelated process group; ``down`` must not kill that. Each service's
        command line names a path inside this stack, so one member has to mention it.
        """
        members = _service_processes(group)
        if not members or not Path("/proc").is_dir():
            return members
        marker = {
            "seaweedfs": str(self.run_dir / "seaweedfs"),
            "mlflow": str(self.run_dir / "mlflow.db"),
            "ray": str(self._ray_temp_dir()),
        }[service]
        return members if any(marker in _command_line(pid) for pid in members) else {}

    def _check_ports_free(self, service: str) -> None:
        for spec in self.ports(service):
            if not _port_is_free(spec.port):
                raise PortInUseError(spec.port, spec.role, spec.hint)

    def _stop_all(self, services: list[str], timeout_s: float) -> list[str]:
        # Concurrently: SeaweedFS alone takes ~15 s, and nothing else has to outlive it.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
            results = list(pool.map(lambda s: self._stop(s, timeout_s), services))
        return [s for s, was_running in zip(services, results) if was_running]

    def _stop(self, service: str, timeout_s: float) -> bool:
        """Stops one service by its recorded process group; True if anything was running."""
        path = self.pid_file(service)
        try:
            group = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            group = None
        began = time.monotonic()
        # Snapshot now: Ray's workers run in process groups of their own, children of the
        # raylet, and are reparented (out of sight) once it dies. Empty for a stale PID file:
        # a group we cannot vouch for is never signalled.
        snapshot = self._processes_of(service, group) if group else {}
        stages = _RAY_SHUTDOWN_STAGES if service == "ray" else (lambda comm: True,)
        for in_stage in stages if snapshot else ():
            alive = _alive(snapshot, group)
            _terminate([pid for pid, comm in alive.items() if in_stage(comm)], timeout_s)
        if snapshot:
            _terminate(list(_alive(snapshot, group)), 0.0)  # spawned during shutdown, if any
            self._say(f"stopped {service} (pid {group}) in {time.monotonic() - began:.1f}s")
        process = self._processes.pop(service, None)
        if process is not None:
            process.poll()  # reap our own child so it does not linger as a zombie
        path.unlink(missing_ok=True)
        return bool(snapshot)

    def _save_config(self) -> None:
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        config["run_dir"] = str(self.run_dir)
        (self.run_dir / "stack.json").write_text(json.dumps(config, indent=2) + "\n")

    def _say(self, message: str, end: str = "\n") -> None:
        if self.verbose:
            print(message, end=end, flush=True)


# --------------------------------------------------------------------- process helpers


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to anything


def _tool(name: str) -> str:
    """The console script ``name`` of this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found next to {sys.executable} or on PATH")
    return found


def _process_table() -> dict[int, tuple[int, int, str]] | None:
    """pid -> (parent pid, process group, command name) of live processes; None without /proc."""
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:
        return None
    table = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # exited meanwhile
        # The command name is in parentheses and may itself contain spaces or parentheses.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        # Zombies count as gone: an exited child of a long-lived parent (the pytest process)
        # stays a zombie until reaped, and signalling it would "succeed" forever.
        if state not in ("Z", "X"):
            table[int(entry)] = (int(ppid), int(pgrp), comm)
    return table


def _service_processes(group: int) -> dict[int, str]:
    """Live processes of a service: its process group plus all their descendants.

    Args:
        group: Process group id from the PID file.

    Returns:
        pid -> command name.
    """
    table = _process_table()
    if table is None:  # no /proc (macOS): the group is all we can see
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return {}
        return {group: "?"}
    members = {pid: info[2] for pid, info in table.items() if info[1] == group}
    grew = True
    while grew:
        children = {
            pid: info[2]
            for pid, info in table.items()
            if info[0] in members and pid not in members
        }
        members.update(children)
        grew = bool(children)
    return members


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(snapshot: dict[int, str], group: int) -> dict[int, str]:
    """The processes of ``snapshot`` still alive, plus any new member of ``group``."""
    table = _process_table()
    if table is None:
        return _service_processes(group)
    return {
        pid: info[2] for pid, info in table.items() if pid in snapshot or info[1] == group
    }


def _terminate(pids: list[int], timeout_s: float) -> None:
    """SIGTERM ``pids``, wait up to ``timeout_s`` for them to exit, then SIGKILL the rest."""
    if not pids:
        return
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _still_alive(pids):
        time.sleep(0.1)
    survivors = _still_alive(pids)
    if survivors:
        _signal_all(survivors, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _still_alive(survivors):
            time.sleep(0.05)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _still_alive(pids: list[int]) -> list[int]:
    table = _process_table()
    if table is None:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return alive
    return [pid for pid in pids if pid in table]


def _port_is_free(port: int) -> bool:
    """True if nothing listens on ``port`` on any local address.

    Binds the wildcard address because Ray's GCS listens on all interfaces; SO_REUSEADDR so a
    port left in TIME_WAIT by a stack that just stopped does not count as busy (the servers
    set it too).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def _reserve_port(held: list[socket.socket], pair: bool) -> int:
    """Binds a free port (and, with ``pair``, its +1) and keeps the sockets in ``held``."""
    for _ in range(100):
        first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        first.bind(("", 0))
        port = first.getsockname()[1]
        if not pair:
            held.append(first)
            return port
        second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            second.bind(("", port + 1))
        except (OSError, OverflowError):  # taken, or port was 65535
            first.close()
            second.close()
            continue
        held.extend([first, second])
        return port
    raise RuntimeError("found no free pair of adjacent ports in 100 tries")


def _http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.read().decode(errors="replace")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return "none"
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------- command line


def _print_status(stack: LocalStack, report: list[ServiceStatus]) -> None:
    rows = [("service", "state", "pid", "procs", "ports", "health")]
    for s in report:
        # gRPC ports are always HTTP + 1; leaving them out keeps the table readable.
        ports = " ".join(
            f"{role.removeprefix(s.name + ' ').replace(' ', '-')}:{port}"
            for role, port in s.ports.items()
            if not role.endswith("gRPC")
        )
        state = "up" if s.up else ("unhealthy" if s.pid else "down")
        rows.append(
            (s.name, state, str(s.pid or "-"), str(s.processes or "-"), ports, s.health)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print(f"run dir: {stack.run_dir}")
    if stack.env_file.exists():
        print(f"client environment: source {stack.env_file}")


def main(argv: list[str] | None = None) -> int:
    """``python -m janus_lab.stack up|down|status [--run-dir DIR] [--no-ray]``.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Exit code: 0 on success; 1 when ``up`` fails.
    """
    parser = argparse.ArgumentParser(
        prog="python -m janus_lab.stack",
        description="Local stack: SeaweedFS S3 + MLflow + Ray head. Ports: "
        + ", ".join(ENV_OVERRIDES),
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="data, logs, PID files and env.sh (default: $JANUS_STACK_DIR or <repo>/run/stack)",
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="without the Ray head (S3 + MLflow only)"
    )
    args = parser.parse_args(argv)
    stack = LocalStack.for_run_dir(args.run_dir, with_ray=not args.no_ray)

    if args.command == "up":
        began = time.monotonic()
        try:
            stack.up()
        except (PortInUseError, RuntimeError, TimeoutError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"up in {time.monotonic() - began:.1f}s")
        _print_status(stack, stack.status())
    elif args.command == "down":
        began = time.monotonic()
        stopped = stack.down()
        if stopped:
            print(f"stopped {', '.join(stopped)} in {time.monotonic() - began:.1f}s")
        else:
            print("nothing was running")
    else:
        _print_status(stack, stack.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
