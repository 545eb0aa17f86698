"""The image server: a Ray Serve application (model deployment + OpenAI-style HTTP API).

`serve/config.yaml` names `serve.app:build`, which calls `build_app(args)` here.
"""

from typing import Any

from ray.serve import Application

from janus_lab.serving.access import ApiLimiter
from janus_lab.serving.api import ImageApi
from janus_lab.serving.model import ImageModel
from janus_lab.serving.settings import AccessConfig, ModelUserConfig, ServeArgs, ServeLimits


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application: `ImageApi` (ingress) bound to an `ImageModel` and the `ApiLimiter`
    that counts each API key's use for every `ImageApi` replica.

    Args:
        args: the `args` of serve/config.yaml (see `ServeArgs`); checked here, so a bad key
            fails the deploy at once rather than in every replica.
    """
    args = dict(args or {})
    ServeArgs.parse(args)
    return ImageApi.bind(ImageModel.bind(args), args, ApiLimiter.bind(args))


__all__ = ["build_app", "AccessConfig", "ApiLimiter", "ImageApi", "ImageModel", "ModelUserConfig",
           "ServeArgs", "ServeLimits"]
