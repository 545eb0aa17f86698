"""The local stack over real HTTP: SeaweedFS S3, MLflow, PID files, busy ports.

No mocks: every integration test talks to the processes `make up` would start (the Ray head
excepted: `ray start` alone takes 15-60 s on a 2-core box, so it is checked by hand through
`make up` / `make status` / `ray job submit`, not here).
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from janus_lab.stack import SERVICES, LocalStack, PortInUseError

# --------------------------------------------------------------------- configuration (unit)


def test_from_env_reads_port_overrides(tmp_path: Path):
    stack = LocalStack.from_env(
        {"JANUS_S3_PORT": "18433", "JANUS_MLFLOW_PORT": "15000", "JANUS_BUCKET": "other-bucket"},
        run_dir=tmp_path,
    )
    assert (stack.s3_port, stack.mlflow_port, stack.bucket) == (18433, 15000, "other-bucket")
    assert stack.env()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:18433"


def test_from_env_rejects_a_non_numeric_port(tmp_path: Path):
    with pytest.raises(ValueError, match="JANUS_RAY_PORT"):
        LocalStack.from_env({"JANUS_RAY_PORT": "ray"}, run_dir=tmp_path)


def test_a_port_configured_twice_is_an_error(tmp_path: Path):
    # 9340 is also the SeaweedFS master's default port.
    with pytest.raises(ValueError, match="9340 is configured for both s3 and seaweedfs master"):
        LocalStack(run_dir=tmp_path, s3_port=9340)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "my-laptop.lan"])
def test_the_fixed_local_credentials_are_never_bound_beyond_loopback(tmp_path: Path, host: str):
    with pytest.raises(ValueError, match="not a loopback address.*credentials are fixed"):
        LocalStack(run_dir=tmp_path, host=host)
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert LocalStack(run_dir=tmp_path, host=loopback).host == loopback


def test_env_without_a_running_ray_has_no_ray_variables(tmp_path: Path):
    env = LocalStack(run_dir=tmp_path).env()
    assert not [name for name in env if name.startswith("RAY_")]
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_a_stale_pid_file_never_signals_an_unrelated_process(tmp_path: Path):
    # After a reboot the recorded group id can belong to anything; `down` must leave it alone.
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stack = LocalStack(run_dir=tmp_path, with_mlflow=False, with_ray=False, verbose=False)
        stack.pid_file("seaweedfs").write_text(f"{stranger.pid}\n")
        assert not stack.status()[0].up
        assert stack.down() == []
        assert stranger.poll() is None
        assert not stack.pid_file("seaweedfs").exists()
    finally:
        stranger.kill()
        stranger.wait()


# --------------------------------------------------------------------- S3 (integration)


@pytest.mark.integration
def test_parquet_round_trip_through_pyarrow_and_s3fs(local_stack: LocalStack, s3_prefix: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs
    from pyarrow import fs as pafs

    table = pa.table({"id": [1, 2, 3], "prompt": ["a cat", "a dog", "a fox"]})
    # Both clients configure themselves from AWS_ENDPOINT_URL + keys + region alone; pyarrow
    # only through from_uri (a bare pafs.S3FileSystem() ignores AWS_ENDPOINT_URL).
    arrow_s3, key_prefix = pafs.FileSystem.from_uri(s3_prefix)
    assert isinstance(arrow_s3, pafs.S3FileSystem)
    fsspec_s3 = s3fs.S3FileSystem()

    pq.write_table(table, f"{key_prefix}/by-pyarrow.parquet", filesystem=arrow_s3)
    with fsspec_s3.open(f"{s3_prefix}/by-s3fs.parquet", "wb") as out:
        pq.write_table(table, out)

    # Each client reads what the other wrote.
    with fsspec_s3.open(f"{s3_prefix}/by-pyarrow.parquet", "rb") as src:
        assert pq.read_table(src).equals(table)
    assert pq.read_table(f"{key_prefix}/by-s3fs.parquet", filesystem=arrow_s3).equals(table)
    assert pq.read_table(f"{s3_prefix}/by-s3fs.parquet").equals(table)  # s3:// URI, no fs


@pytest.mark.integration
def test_boto3_lists_what_was_written(local_stack: LocalStack, s3_prefix: str):
    import boto3

    s3 = boto3.client("s3")
    prefix = s3_prefix.removeprefix(f"s3://{local_stack.bucket}/")
    for name in ("a.txt", "b/c.txt"):
        s3.put_object(Bucket=local_stack.bucket, Key=f"{prefix}/{name}", Body=name.encode())

    listing = s3.list_objects_v2(Bucket=local_stack.bucket, Prefix=f"{prefix}/")
    assert sorted(o["Key"] for o in listing["Contents"]) == [f"{prefix}/a.txt", f"{prefix}/b/c.txt"]
    body = s3.get_object(Bucket=local_stack.bucket, Key=f"{prefix}/b/c.txt")["Body"].read()
    assert body == b"b/c.txt"


# A child process that downloads a prefix and reports how many objects it fetched itself. It
# starts once the go file exists, so that the children's downloads overlap.
DOWNLOADER = """
import json, os, sys, time
import s3fs
from janus_lab.storage import download_prefix

fetched = []
get_file = s3fs.S3FileSystem.get_file
def counting(self, remote, local, *args, **kwargs):
    fetched.append(remote)
    return get_file(self, remote, local, *args, **kwargs)
s3fs.S3FileSystem.get_file = counting
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.005)
print(json.dumps({"path": str(download_prefix(sys.argv[1], sys.argv[2])), "fetched": len(fetched)}))
"""


@pytest.mark.integration
def test_processes_sharing_a_cache_download_a_prefix_once(local_stack: LocalStack, s3_prefix: str, tmp_path: Path):
    import json
    import os
    import sys

    from janus_lab.storage import upload_folder

    source = tmp_path / "checkpoint"
    files = {"config.json": b"{}", "model-00001.safetensors": os.urandom(3 << 20),
             "model-00002.safetensors": os.urandom(3 << 20)}
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    upload_folder(source, s3_prefix)

    def download_together(count: int) -> list[dict]:
        go = tmp_path / f"go-{uuid.uuid4().hex}"
        children = [subprocess.Popen([sys.executable, "-c", DOWNLOADER, s3_prefix, str(tmp_path / "cache"), str(go)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(count)]
        assert [child.stdout.readline().strip() for child in children] == ["ready"] * count
        go.touch()
        outputs = [child.communicate(timeout=120) for child in children]
        assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in outputs]
        return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    reports = download_together(4)
    assert len({r["path"] for r in reports}) == 1
    assert sorted(r["fetched"] for r in reports) == [0, 0, 0, len(files)]  # one fetched, three reused it
    folder = Path(reports[0]["path"])
    assert {name: (folder / name).read_bytes() for name in files} == files

    # A changed object changes the listing: the next users fetch the new copy, again only once.
    files["config.json"] = b'{"changed": true}'
    (source / "config.json").write_bytes(files["config.json"])
    upload_folder(source, s3_prefix)
    reports = download_together(2)
    assert sorted(r["fetched"] for r in reports) == [0, len(files)]
    assert (folder / "config.json").read_bytes() == files["config.json"]


# --------------------------------------------------------------------- MLflow (integration)


@pytest.mark.integration
def test_mlflow_logs_metrics_and_stores_artifacts_in_the_bucket(
    local_stack: LocalStack, tmp_path: Path
):
    import boto3
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    # create_experiment, not set_experiment: the latter exports MLFLOW_EXPERIMENT_ID for the
    # rest of the session (docs/platform-notes.md, "MLflow 3").
    experiment_id = client.create_experiment(f"test-stack-{uuid.uuid4().hex[:8]}")
    note = tmp_path / "note.txt"
    note.write_text("written by test_stack")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("loss", 0.25, step=1)
        mlflow.log_artifact(str(note))

    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.25}
    # The client only knows the tracking URI; the server put the file into S3.
    listing = boto3.client("s3").list_objects_v2(
        Bucket=local_stack.bucket, Prefix=f"mlflow/{experiment_id}/"
    )
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert keys == [f"mlflow/{experiment_id}/{run.info.run_id}/artifacts/note.txt"]


# --------------------------------------------------------------------- lifecycle (integration)


def _listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def _free_port_pair() -> int:
    """A port p with p and p + 1 both free."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("setting", "role", "variable"),
    [
        ("s3_port", "s3", "JANUS_S3_PORT"),
        ("mlflow_port", "mlflow", "JANUS_MLFLOW_PORT"),
        ("ray_port", "ray gcs", "JANUS_RAY_PORT"),
    ],
)
def test_a_busy_port_is_named_and_nothing_starts(
    tmp_path: Path, setting: str, role: str, variable: str
):
    with socket.socket() as probe:
        probe.bind(("", 0))
        busy = probe.getsockname()[1]
    with _listening_socket(busy):
        stack = LocalStack.with_free_ports(tmp_path, **{setting: busy})
        with pytest.raises(PortInUseError) as caught:
            stack.up()
    message = str(caught.value)
    assert f"port {busy} for {role} is already in use" in message
    assert variable in message
    assert not list(tmp_path.glob("*.pid"))


@pytest.mark.integration
def test_a_busy_grpc_port_names_the_setting_it_derives_from(tmp_path: Path):
    port = _free_port_pair()
    with _listening_socket(port + 1):
        with pytest.raises(PortInUseError, match=rf"port {port + 1} for s3 gRPC .*JANUS_S3_PORT"):
            LocalStack.with_free_ports(tmp_path, s3_port=port, with_ray=False).up()


@pytest.mark.integration
def test_status_follows_up_and_down(tmp_path: Path):
    # S3 alone: the lifecycle is the same for every service, and this keeps the test ~5 s.
    stack = LocalStack.with_free_ports(tmp_path, with_mlflow=False, with_ray=False)
    try:
        stack.up()
        (status,) = stack.status()
        assert status.name == "seaweedfs" and status.up, status
        pid = status.pid
        assert stack.pid_file("seaweedfs").read_text().strip() == str(pid)
        assert stack.env_file.read_text().count("export AWS_ENDPOINT_URL=") == 1

        stack.up()  # idempotent: reports the running service, starts nothing new
        assert stack.status()[0].pid == pid
    finally:
        stopped = stack.down(timeout_s=3.0)

    assert stopped == ["seaweedfs"]
    (status,) = stack.status()
    assert (status.up, status.pid, status.processes) == (False, None, 0)
    assert not [s for s in SERVICES if stack.pid_file(s).exists()]
    assert not stack.env_file.exists()
