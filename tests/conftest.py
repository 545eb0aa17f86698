"""Shared fixtures: the local stack (SeaweedFS S3 + MLflow) for integration tests.

The stack is the one `make up` runs (``janus_lab.stack.LocalStack``), on ports picked free at
start so it never clashes with a developer's `make up` stack, in a temporary run folder, and
without Ray: tests start their own throwaway cluster with ``ray.init(address="local")``.
Tests that use ``local_stack`` are marked ``@pytest.mark.integration``.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from janus_lab.stack import LocalStack


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory):
    """A running S3 + MLflow stack whose client variables are set for the whole session.

    Yields:
        The started ``LocalStack``; ``env()`` holds what was set (AWS_*, MLFLOW_*, JANUS_BUCKET).
    """
    stack = LocalStack.with_free_ports(tmp_path_factory.mktemp("stack"), with_ray=False)
    stack.up()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in stack.env().items():
                patch.setenv(name, value)
            # A sourced env.sh of a `make up` stack would send a bare ray.init() there.
            for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
                patch.delenv(name, raising=False)
            yield stack
    finally:
        # The run folder is thrown away, so SeaweedFS's graceful ~15 s drain buys nothing.
        stack.down(timeout_s=3.0)


@pytest.fixture
def s3_prefix(local_stack: LocalStack, request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://<bucket>/tests/<test name>-<pid>`` prefix for one test."""
    name = request.node.name.replace("[", "-").replace("]", "")
    return f"s3://{local_stack.bucket}/tests/{name}-{os.getpid()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_cluster():
    """One local Ray cluster and Serve instance for a module's applications; yields the base URL."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver (both Debian packages)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("chromium and chromedriver are needed (`apt-get install -y chromium chromium-driver`; "
                    "`make test` installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
