"""`LocalStack`: the settings of one machine's stack, and starting, checking and stopping it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from janus_lab.stack.processes import (command_line, group_processes, name_of, port_is_free, reserve_port,
                                       still_running, terminate)
from janus_lab.stack.services import RAY, SERVICE, SERVICES, Service, one_line, tail

ENV_OVERRIDES = {
    "JANUS_STACK_DIR": "run_dir",
    **{port.env_var: port.setting for service in SERVICES for port in service.ports},
    "JANUS_BUCKET": "bucket",
}
"""Environment variable -> LocalStack field, read by `LocalStack.from_env`."""

_ENV_VAR_OF_FIELD = {name: var for var, name in ENV_OVERRIDES.items()}

_PROJECT_ROOT = Path(__file__).resolve().parents[3]
"""The repo root when the package is installed in place (`pip install -e .`)."""

# S3 bucket naming rules; SeaweedFS rejects the rest (e.g. one-letter names) at create time.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class PortInUseError(RuntimeError):
    """A port the stack needs is already taken by another process.

    Attributes:
        port: The busy port.
        role: What the stack wanted it for, e.g. `"s3"` or `"ray gcs"`.
    """

    def __init__(self, port: int, role: str, hint: str):
        self.port = port
        self.role = role
        super().__init__(f"port {port} for {role} is already in use; {hint}, or stop whatever holds it "
                         f"(another stack? run `make status`)")


@dataclass(frozen=True)
class PortSpec:
    """One port a service binds, and how a user moves it."""

    role: str
    """What the port is for, e.g. `"seaweedfs master gRPC"`."""
    port: int
    """The port number."""
    hint: str
    """How to change it, quoted in `PortInUseError`."""


@dataclass(frozen=True)
class ServiceStatus:
    """What `LocalStack.status` knows about one service."""

    name: str
    """Service name: one of `SERVICES`."""
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
    """`<repo>/run/stack` for a source checkout, `./run/stack` for an installed package."""
    repo = _PROJECT_ROOT if (_PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()
    return repo / "run" / "stack"


@dataclass
class LocalStack:
    """S3 + MLflow + Ray head for one machine, started as subprocesses under `run_dir`.

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
    """Ray client server (`ray://` addresses)."""
    ray_dashboard_agent_port: int = 52375
    """Ray dashboard agent (HTTP). Not Ray's default 52365: any other Ray cluster on the machine
    (a test's `ray.init(address="local")`) takes that one, and an agent that cannot bind makes
    `ray job submit` fail with "No available agent to submit job"."""
    bucket: str = "janus-lab"
    """Bucket created at start; MLflow artifacts go under `s3://<bucket>/mlflow`."""
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
    """Run a Ray head. Tests leave it off and use `ray.init(address="local")`."""
    start_timeout_s: float = 180.0
    """Longest wait for one service to become ready (Ray needs ~15 s idle, ~60 s on a busy box)."""
    stop_timeout_s: float = 30.0
    """Wait after SIGTERM before SIGKILL. SeaweedFS needs ~15 s: its filer drains gRPC streams."""
    verbose: bool = True
    """Print progress lines."""

    _launchers: dict[str, subprocess.Popen] = field(default_factory=dict, init=False, repr=False, compare=False)
    _launched_at: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

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
            for spec in self.ports(service.name):
                if not 0 < spec.port < 65536:
                    raise ValueError(f"port {spec.port} for {spec.role} is out of range")
                if spec.port in seen:
                    raise ValueError(f"port {spec.port} is configured for both {seen[spec.port]} and {spec.role}")
                seen[spec.port] = spec.role

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> LocalStack:
        """Builds a stack from the defaults, `JANUS_*` variables, then explicit overrides.

        Args:
            environ: Where to read the variables (default `os.environ`).
            **overrides: Field values that win over the environment (None values are ignored).

        Raises:
            ValueError: A `JANUS_*_PORT` variable is not an integer.
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
        """The stack recorded in `run_dir` if any of its services runs, else `from_env`.

        `up` records its configuration in `<run>/stack.json`, so `status` and a second `up`
        see the ports actually in use even from a shell without the `JANUS_*` variables.

        Args:
            run_dir: The run folder (default: `JANUS_STACK_DIR` or `<repo>/run/stack`).
            **overrides: Fields that win over both (e.g. `with_ray`).
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
        """A stack on ports that are free right now, so it never clashes with `make up`.

        A port with a gRPC twin is picked together with its +1 neighbour. The ports are held
        while picking (no duplicates) and released on return, so start the stack soon after.
        """
        held: list[socket.socket] = []
        try:
            ports = {port.setting: reserve_port(held, pair=port.grpc) for service in SERVICES for port in service.ports}
        finally:
            for sock in held:
                sock.close()
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
        """Ray GCS address (`RAY_ADDRESS`)."""
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
        """`env.sh` written by `up`."""
        return self.run_dir / "env.sh"

    def pid_file(self, service: str) -> Path:
        """`<run>/<service>.pid`: the service's process group id."""
        return self.run_dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        """`<run>/<service>.log`: the service's stdout and stderr."""
        return self.run_dir / f"{service}.log"

    def enabled(self) -> list[str]:
        """The services this configuration runs, in start order."""
        return [service.name for service in SERVICES if service.enabled(self)]

    def ports(self, service: str) -> list[PortSpec]:
        """Every port `service` binds (main port first), with the setting that moves it."""
        if service not in SERVICE:
            raise ValueError(f"unknown service {service!r}; expected one of {tuple(SERVICE)}")
        specs = []
        for port in SERVICE[service].ports:
            where = f"set {port.env_var} or LocalStack({port.setting}=...)"
            specs.append(PortSpec(port.role, getattr(self, port.setting), where))
            if port.grpc:
                specs.append(PortSpec(f"{port.role} gRPC", getattr(self, port.setting) + 1,
                                      f"{where} (gRPC uses {port.setting} + 1)"))
        return specs

    # ----------------------------------------------------------------- client environment

    def env(self) -> dict[str, str]:
        """The environment a client needs to use this stack.

        pyarrow, s3fs, boto3 and Ray Data read the `AWS_*` variables; MLflow clients need only
        the tracking URI (artifacts go through the server). Ray variables appear only while the
        Ray head runs.
        """
        env = self._storage_env()
        if self.with_ray and self._group_of(RAY):
            env.update(RAY.client_env(self))
        return env

    def _storage_env(self) -> dict[str, str]:
        """The S3 and MLflow part of `env()`."""
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
        """Writes `env()` as export lines to `<run>/env.sh` and returns its path."""
        lines = ["# Client environment of the janus-lab local stack; written by `python -m janus_lab.stack up`.",
                 f"# Use it with: source {self.env_file}"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        self.env_file.write_text("\n".join(lines) + "\n")
        return self.env_file

    # ----------------------------------------------------------------- lifecycle

    def up(self) -> LocalStack:
        """Starts every enabled service that is not already running and waits until all are ready.

        Idempotent: a running service is reported and left alone. All ports are checked before
        anything starts. If a service fails, the ones this call started are stopped again.

        Returns:
            self, so `stack = LocalStack(...).up()` reads naturally.

        Raises:
            PortInUseError: A port is taken (nothing was started).
            RuntimeError: A service exited while starting (its log tail is in the message).
            TimeoutError: A service did not become ready within `start_timeout_s`.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wanted = [service for service in SERVICES if service.enabled(self)]
        to_start = []
        for service in wanted:
            group = self._group_of(service)
            if group:
                self._say(f"{service.name} already running (pid {group})")
            else:
                to_start.append(service)
        for service in to_start:
            for spec in self.ports(service.name):
                if not port_is_free(spec.port):
                    raise PortInUseError(spec.port, spec.role, spec.hint)

        started: list[str] = []
        try:
            # Launch everything first, then wait: MLflow and Ray do not need S3 to boot, and the
            # starts overlap instead of adding up.
            for service in to_start:
                self._spawn(service.name, service.command(self))
                started.append(service.name)
            for service in wanted:
                self._say(f"waiting for {service.name} ...", end=" ")
                service.wait(self)
        except BaseException:
            self._say("failed")
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
            timeout_s: Wait after SIGTERM before SIGKILL (default `stop_timeout_s`). Throwaway
                stacks (tests) pass a few seconds rather than wait out SeaweedFS's drain.

        Returns:
            The services that were running.
        """
        running = [s.name for s in SERVICES if self.pid_file(s.name).exists()]
        stopped = self._stop_all(running, timeout_s or self.stop_timeout_s)
        self.env_file.unlink(missing_ok=True)
        return stopped

    def stop_service(self, name: str, timeout_s: float | None = None) -> bool:
        """Stops one service and leaves the others running; `up()` starts it again on the same
        ports and data (how tests inject an outage, tests/test_faults.py). True if it was running."""
        if name not in SERVICE:
            raise ValueError(f"unknown service {name!r}; expected one of {tuple(SERVICE)}")
        return self._stop(SERVICE[name], timeout_s or self.stop_timeout_s)

    def status(self) -> list[ServiceStatus]:
        """One `ServiceStatus` per enabled service: alive or not, PID, ports and a health check."""
        report = []
        for service in SERVICES:
            if not service.enabled(self):
                continue
            group = self._group_of(service)
            ports = {spec.role: spec.port for spec in self.ports(service.name)}
            if not group:
                report.append(ServiceStatus(service.name, False, None, 0, ports, "not running"))
                continue
            healthy, health = service.probe(self)
            processes = len(self._processes_of(service, group))
            report.append(ServiceStatus(service.name, healthy, group, processes, ports, health))
        return report

    # ----------------------------------------------------------------- what services use

    def launcher(self, service: str) -> subprocess.Popen | None:
        """The process this object started for `service` (None if another one did)."""
        return self._launchers.get(service)

    def launched_at(self, service: str) -> float:
        """`time.monotonic()` of its launch (now, if this object did not launch it)."""
        return self._launched_at.get(service, time.monotonic())

    def wait_until(self, service: str, check: Callable[[], None], watch_process: bool = True) -> None:
        """Calls `check` until it stops raising, the launched process dies, or time runs out.

        The time counts from the service's launch, so "ready in" is its real start-up time.
        """
        started = self.launched_at(service)
        process = self.launcher(service) if watch_process else None
        last_error: Exception | None = None
        while True:
            try:
                check()
                self._say(f"ready in {time.monotonic() - started:.1f}s")
                return
            except Exception as error:  # noqa: BLE001 - not ready yet, keep the reason
                last_error = error
            log = self.log_file(service)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{service} exited with code {process.returncode} while starting; last "
                                   f"lines of {log}:\n{tail(log)}")
            if time.monotonic() - started > self.start_timeout_s:
                raise TimeoutError(f"{service} not ready after {self.start_timeout_s:.0f}s "
                                   f"(last error: {one_line(last_error)}); see {log}")
            time.sleep(0.25)

    # ----------------------------------------------------------------- processes

    def _service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # A sourced env.sh of some stack must not make `ray start --head` join that cluster.
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
            env.pop(var, None)
        # Tools next to this interpreter come first: Ray job entrypoints run `python` from the
        # raylet's PATH, which otherwise finds the system Python without ray installed.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
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
            **RAY.auth_env(self),
        )
        return env

    def _spawn(self, service: str, command: list[str]) -> None:
        log_path = self.log_file(service)
        with open(log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            log.flush()
            # Own process group: `down` signals exactly this service's processes, and Ctrl-C in
            # the terminal that ran `make up` does not reach them.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=self.run_dir, env=self._service_env(), start_new_session=True)
        self._launchers[service] = process
        self._launched_at[service] = time.monotonic()
        self.pid_file(service).write_text(f"{process.pid}\n")
        self._say(f"started {service} (pid {process.pid}, log {log_path})")

    def _recorded_group(self, service: str) -> int | None:
        try:
            return int(self.pid_file(service).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _group_of(self, service: Service) -> int | None:
        """The service's process group id if any of its processes is alive, else None."""
        group = self._recorded_group(service.name)
        return group if group and self._processes_of(service, group) else None

    def _processes_of(self, service: Service, group: int) -> dict:
        """Live processes of `group` (and descendants), if one of them names `service.marker`
        (else a recycled group id of somebody else's: nothing)."""
        members = group_processes(group)
        marker = service.marker(self)
        return members if any(marker in command_line(process) for process in members.values()) else {}

    def _stop_all(self, services: list[str], timeout_s: float) -> list[str]:
        # Concurrently: SeaweedFS alone takes ~15 s, and nothing else has to outlive it.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
            results = list(pool.map(lambda name: self._stop(SERVICE[name], timeout_s), services))
        return [name for name, was_running in zip(services, results) if was_running]

    def _stop(self, service: Service, timeout_s: float) -> bool:
        """Stops one service by its recorded process group; True if anything was running."""
        group = self._recorded_group(service.name)
        began = time.monotonic()
        # Snapshot now: Ray's workers run in process groups of their own, children of the
        # raylet, and are reparented (out of sight) once it dies. Empty for a stale PID file:
        # a group we cannot vouch for is never signalled.
        snapshot = self._processes_of(service, group) if group else {}
        for in_stage in service.shutdown_stages if snapshot else ():
            alive = still_running(snapshot, group)
            terminate([process for process in alive.values() if in_stage(name_of(process))], timeout_s)
        if snapshot:
            terminate(list(still_running(snapshot, group).values()), 0.0)  # spawned during shutdown, if any
            self._say(f"stopped {service.name} (pid {group}) in {time.monotonic() - began:.1f}s")
        launcher = self._launchers.pop(service.name, None)
        if launcher is not None:
            launcher.poll()  # reap our own child so it does not linger as a zombie
        self.pid_file(service.name).unlink(missing_ok=True)
        return bool(snapshot)

    def _save_config(self) -> None:
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        config["run_dir"] = str(self.run_dir)
        (self.run_dir / "stack.json").write_text(json.dumps(config, indent=2) + "\n")

    def _say(self, message: str, end: str = "\n") -> None:
        if self.verbose:
            print(message, end=end, flush=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to anything
