"""Fault injection into the real services of a local stack (tests/test_faults.py).

`S3Outage` stops the SeaweedFS process a stack launched, keeps it down, then starts it again on
the same ports and data folder, in a background thread, so the job under test runs through it.
`RayWorkerNode` joins a second raylet to the test's cluster and kills it whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from janus_lab.stack import LocalStack

OUTAGE_S = float(os.environ.get("JANUS_FAULT_OUTAGE_S", "10"))
"""How long tests keep S3 down; the issue's 30 s is a run with JANUS_FAULT_OUTAGE_S=30 (docs/reliability.md)."""
MLFLOW_OUTAGE_S = float(os.environ.get("JANUS_FAULT_MLFLOW_OUTAGE_S", "10"))
"""How long tests keep the MLflow server down; the issue's 60 s is JANUS_FAULT_MLFLOW_OUTAGE_S=60."""


@dataclass
class S3Outage:
    """Stops `stack`'s SeaweedFS once `trigger()` is true, for `seconds`, then starts it again.

    With `until`, S3 stays down past `seconds` until `until()` is true (a job has failed), for
    at most `deadline_s` more: an outage as long as the job's retry budget, whatever that turns
    out to be in wall time, not one the test guessed.

    Attributes set as it runs: `stopped_at`, `restarted_at` (time.monotonic()), `error` (what went
    wrong in the thread, re-raised by `join`).
    """

    stack: LocalStack
    seconds: float = OUTAGE_S
    trigger: Callable[[], bool] = lambda: True
    until: Callable[[], bool] | None = None
    deadline_s: float = 180.0
    stopped_at: float | None = None
    restarted_at: float | None = None
    error: BaseException | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> "S3Outage":
        self._thread = threading.Thread(target=self._run, name="s3-outage", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float = 240.0) -> "S3Outage":
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        assert self.restarted_at is not None, "the outage never ended"
        return self

    @property
    def down_s(self) -> float:
        """Seconds from the stop command until S3 answered again."""
        return self.restarted_at - self.stopped_at

    def _run(self) -> None:
        try:
            give_up = time.monotonic() + self.deadline_s
            while not self.trigger():
                if time.monotonic() > give_up:
                    raise TimeoutError("the outage's trigger never fired")
                time.sleep(0.05)
            self.stopped_at = time.monotonic()
            # SIGKILL after 1 s: a crash rather than a drain, the harder case for the data.
            self.stack.stop_service("seaweedfs", timeout_s=1.0)
            time.sleep(max(0.0, self.seconds - (time.monotonic() - self.stopped_at)))
            give_up = time.monotonic() + self.deadline_s
            while self.until is not None and not self.until() and time.monotonic() < give_up:
                time.sleep(0.1)
            self.stack.up()  # same ports, same data folder; returns once the bucket answers
            self.restarted_at = time.monotonic()
        except BaseException as error:  # noqa: BLE001 - handed to the test by join()
            self.error = error
            try:
                self.stack.up()
            except BaseException:  # noqa: BLE001
                pass


@dataclass
class RayWorkerNode:
    """A second raylet joined to a running cluster (`ray start --address ... --block`), in a
    process group of its own, so `kill()` takes the raylet and everything it started at once:
    a lost machine, not a drained one.

    Attributes set as it runs: `node_id` (once it joined), `killed_at` (time.monotonic()).
    """

    address: str
    num_cpus: int
    join_timeout_s: float = 90.0
    node_id: str | None = None
    killed_at: float | None = None
    _process: "subprocess.Popen | None" = field(default=None, repr=False)

    def start(self) -> "RayWorkerNode":
        import ray

        from conftest import free_port

        before = {node["NodeID"] for node in ray.nodes()}
        ports = {flag: str(free_port()) for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                     "--metrics-export-port", "--runtime-env-agent-port")}
        command = [str(Path(sys.executable).with_name("ray")), "start", f"--address={self.address}",
                   f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--block", "--disable-usage-stats",
                   *[f"{flag}={port}" for flag, port in ports.items()]]
        # Its own session: one killpg reaches the raylet and the agents and workers it started.
        self._process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.join_timeout_s
        while self.node_id is None:
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the second raylet did not join {self.address} ({' '.join(command)})")
            time.sleep(0.5)
            joined = [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeID"] not in before]
            self.node_id = joined[0] if joined else None
        return self

    def kill(self) -> None:
        """SIGKILL to the node's whole process group; returns once the cluster has marked it dead."""
        import ray

        self.killed_at = time.monotonic()
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=30)
        deadline = time.monotonic() + 120
        while self.node_id and time.monotonic() < deadline:
            if not any(node["NodeID"] == self.node_id and node["Alive"] for node in ray.nodes()):
                return
            time.sleep(0.5)
