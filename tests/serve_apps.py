"""The image server's application as the tests deploy it: serve/config.yaml's deployments with
their options as written, bound the way `serve.app:build` binds them."""

from __future__ import annotations

import copy
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
