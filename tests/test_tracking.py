"""A tracking server that is down is named at once, by every job that needs it.

MLflow's client alone retries a refused connection for minutes before it raises; these jobs
check `<uri>/health` first. The dead address is a free port on 127.0.0.1 that nothing listens on.
"""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from janus_lab.config import load_config
from janus_lab.generation.loading import ModelSourceError, registered_version
from janus_lab.registry import PromoteConfig, PromotionError, promote
from janus_lab.sweeps.cfg import run_cfg_sweep
from janus_lab.sweeps.config import CfgSweepConfig, MaskingAblationConfig
from janus_lab.sweeps.masking import run_masking_ablation
from janus_lab.sweeps.runner import SweepError
from janus_lab.tracking import TrackingServerError, check_tracking_server
from janus_lab.train.config import ExperimentConfig
from janus_lab.train.launch import PreflightError, run_finetune
from synthetic_shards import write_synthetic_dataset


@pytest.fixture
def dead_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connections are refused


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def answering_uri():
    """A server that answers every path with 404 (as a proxy in front of MLflow might)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler API's name
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_refused_server_is_named_with_what_to_do(dead_uri):
    with pytest.raises(TrackingServerError) as caught:
        check_tracking_server(dead_uri, attempts=2)
    message = str(caught.value)
    assert dead_uri in message and "not reachable" in message and "make up" in message


def test_any_http_answer_or_a_non_http_store_passes(answering_uri, tmp_path):
    check_tracking_server(answering_uri)  # an HTTP error status is still an answer
    check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_tracking_server("databricks")


def test_finetune_stops_before_any_worker(dead_uri, dataset, tmp_path):
    cfg = load_config(ExperimentConfig, "jobs/configs/debug.yaml",
                      [f"data.uri={dataset}", f"train.storage_path={tmp_path / 'runs'}",
                       f"tracking.tracking_uri={dead_uri}"])
    with pytest.raises(PreflightError, match=f"{dead_uri} is not reachable"):
        run_finetune(cfg)
    assert not (tmp_path / "runs").exists()


def test_promote_and_registry_uris_stop_naming_the_server(dead_uri):
    with pytest.raises(PromotionError, match=f"{dead_uri} is not reachable"):
        promote(PromoteConfig(run_id="0" * 32, tracking_uri=dead_uri))
    from mlflow import MlflowClient

    with pytest.raises(ModelSourceError, match=f"models:/janus-4o@champion: .*{dead_uri} is not reachable"):
        registered_version("models:/janus-4o@champion", MlflowClient(dead_uri))


def test_sweeps_stop_before_any_trial(dead_uri, dataset, tmp_path):
    masking = load_config(MaskingAblationConfig, "sweeps/configs/debug.yaml",
                          [f"overrides.data.uri={dataset}", f"tracking.tracking_uri={dead_uri}",
                           f"run.storage_path={tmp_path / 'tune'}"])
    with pytest.raises(SweepError, match=f"{dead_uri} is not reachable"):
        run_masking_ablation(masking)
    cfg_sweep = load_config(CfgSweepConfig, "sweeps/configs/cfg_debug.yaml",
                            [f"tracking.tracking_uri={dead_uri}", f"run.storage_path={tmp_path / 'tune'}"])
    with pytest.raises(SweepError, match=f"{dead_uri} is not reachable"):
        run_cfg_sweep(cfg_sweep)
    assert not (tmp_path / "tune").exists()


def test_buffered_images_logged_one_after_another_each_reach_the_run(tmp_path, monkeypatch):
    """Each queued image gets its own staging folder, whatever the queue's length or the
    image's id() (both repeat between a step-0 grid and a later one)."""
    from mlflow import MlflowClient
    from PIL import Image

    from janus_lab.tracking import BufferedRunLogger

    monkeypatch.chdir(tmp_path)  # the SQLite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = BufferedRunLogger.open_run(uri, "images", "grids", params={}, tags={})
    for step in range(6):
        logger.log_image(Image.new("RGB", (8, 8), (step * 40, 0, 0)), f"samples/step_{step:07d}.png")
        logger.flush()  # the queue is empty again before the next image, as between validations
    logger.end()
    logged = sorted(a.path for a in MlflowClient(uri).list_artifacts(logger.run_id, "samples"))
    assert logged == [f"samples/step_{step:07d}.png" for step in range(6)]
