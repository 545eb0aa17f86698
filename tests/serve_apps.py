"""The image server's application as the tests deploy it: serve/config.yaml's deployments with
their options as written, bound the way `serve.app:build` binds them."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


def serve_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def deployment_options() -> dict[str, dict]:
    """serve/config.yaml's options of each deployment, by name."""
    return {d.pop("name"): d for d in copy.deepcopy(serve_config()["applications"][0]["deployments"])}


def bind_application(args: dict, options: dict[str, dict]):
    """What `build_app` binds, with each deployment's options applied."""
    from janus_lab.serving import ApiLimiter, ImageApi, ImageModel

    return ImageApi.options(**options["ImageApi"]).bind(
        ImageModel.options(**options["ImageModel"]).bind(args), args, ApiLimiter.options(**options["ApiLimiter"]).bind(args))


def wait_for(driver, script: str, timeout: float = 60, poll: float = 0.05):
    """Polls a JS expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(poll)
    state = driver.execute_script("return [document.getElementById('status').textContent, window.playgroundLog]")
    raise AssertionError(f"timed out waiting for: {script} (status {state[0]!r}, events {state[1]})")
