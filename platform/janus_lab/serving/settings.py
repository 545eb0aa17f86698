"""What the image server is configured with: `args` and `user_config` of `serve/config.yaml`.

`args` (fixed for the life of a deployment) become `ServeArgs`; the model deployment's
`user_config` (changed in place with a redeploy, no restart) becomes `ModelUserConfig`. Both
go through the typed config loader, so a misspelt key fails the deploy naming the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from janus_lab.config import ConfigError, check_non_negative, check_positive, from_dict, load_config
from janus_lab.generation import GenerationLimits
from janus_lab.settings import ModelSource, SamplingSettings


@dataclass
class ServeLimits:
    """What one HTTP request may ask for; past these the API answers 4xx before any compute."""

    max_text_tokens: int = 256
    """Longest prompt, in tokens."""
    max_n: int = 4
    """Most images per request (`n`)."""
    max_input_images: int = 4
    """Most `image` files in one edit request."""
    max_upload_bytes: int = 8 * 1024 * 1024
    """Largest uploaded image file, in bytes (413 past it)."""
    max_input_pixels: int = 4096 * 4096
    """Largest uploaded image in pixels, read from its header before it is decoded."""

    def __post_init__(self) -> None:
        check_positive(self, "max_text_tokens", "max_n", "max_input_images", "max_upload_bytes", "max_input_pixels")

    def generation_limits(self, max_batch_size: int) -> GenerationLimits:
        """The engine's limits for batches of up to `max_batch_size` requests."""
        return GenerationLimits(max_text_tokens=self.max_text_tokens, max_parallel_size=self.max_n,
                                max_batch_images=self.max_n * max_batch_size,
                                max_input_images=self.max_input_images, max_input_pixels=self.max_input_pixels)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]+")
"""What an adapter's name may be: it follows the model's id after a colon (`janus-4o:style`)."""

ENV_VAR_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
"""What `access.api_keys_env` must look like: a variable's name, not a key."""

LITERAL_KEY_NAMES = ("api_key", "api_keys", "apikey", "key", "keys", "token", "tokens")
"""Names under `args` or `args.access` that would hold a key written in the config."""


@dataclass
class AccessConfig:
    """Who may call the image endpoints, and how much: API keys and per-key limits."""

    api_keys_env: str | None = None
    """Environment variable of the API replicas holding the accepted keys, comma-separated
    (on KubeRay, from a Secret). Read when a replica starts."""
    api_keys_file: str | None = None
    """Absolute path of a file of accepted keys, one per line, `#` comments (on KubeRay, a
    mounted Secret). Re-read when it changes, so a key rotates without a restart."""
    requests_per_minute: int = 0
    """Most image requests one key may make in any 60 s; 0: no limit. 429 past it."""
    images_per_minute: int = 0
    """Most images (the sum of `n`) one key may ask for in any 60 s; 0: no limit."""

    def __post_init__(self) -> None:
        check_non_negative(self, "requests_per_minute", "images_per_minute")
        # The value is not quoted back: it may be a key someone pasted in.
        if self.api_keys_env is not None and not ENV_VAR_NAME.fullmatch(self.api_keys_env):
            raise ValueError("api_keys_env must be the name of an environment variable (upper case, "
                             "like JANUS_API_KEYS), not a key: keys are never written in the config")
        if self.api_keys_file is not None and not os.path.isabs(self.api_keys_file):
            raise ValueError("api_keys_file must be an absolute path: replicas run in their own "
                             "working directory")

    @property
    def open(self) -> bool:
        """No key source: anyone who reaches the port may call (the local demo)."""
        return self.api_keys_env is None and self.api_keys_file is None


@dataclass
class ServeArgs(ModelSource):
    """The application's `args` in serve/config.yaml: the model (`ModelSource`: model, device,
    dtype, compile), request defaults and limits, access."""

    model: str = "models:/janus-4o@champion"
    """What to serve: models:/name@alias (followed when the alias moves), models:/name/version,
    a checkpoint folder, an s3:// prefix, `mini`, or `debug` (tiny random model, smoke tests only)."""
    defaults: SamplingSettings = field(default_factory=SamplingSettings)
    """Sampling defaults for fields a request leaves out."""
    defaults_file: str | None = None
    """A YAML of SamplingSettings fields (the CFG sweep's best setting); overrides `defaults`."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    """Request limits."""
    access: AccessConfig = field(default_factory=AccessConfig)
    """API keys and per-key rate limits."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters served over `model`, by name; a request picks one with `model: "<id>:<name>"`.
    Each is an adapter folder, `s3://` prefix or `models:/` version trained on this `model`."""
    max_adapters_per_replica: int = 4
    """Adapters one replica keeps loaded; past it the least recently used is unloaded."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "max_adapters_per_replica")
        for name, uri in self.adapters.items():
            if not ADAPTER_NAME.fullmatch(name) or not isinstance(uri, str) or not uri.strip():
                raise ValueError(f"adapters.{name}: an adapter needs a name of letters, digits, '.', '_' or '-' "
                                 f"and a URI, got {uri!r}")
        if self.adapters and "@" in self.model:
            raise ValueError(f"adapters need a fixed base, but model={self.model} follows an alias that can move "
                             "to a version they were not trained on; name the version (models:/<name>/<version>)")
        if self.adapters and self.compile:
            raise ValueError("compile=true captures one set of weights in CUDA graphs; it cannot switch "
                             "adapters between batches: set compile=false to serve adapters")
        if 0 < self.access.images_per_minute < self.limits.max_n:
            raise ValueError(f"access.images_per_minute ({self.access.images_per_minute}) must be 0 or at "
                             f"least limits.max_n ({self.limits.max_n}), or a request of n images never passes")

    @classmethod
    def parse(cls, args: Mapping[str, Any] | None) -> "ServeArgs":
        """`args` from the config file, checked; `defaults_file` is read here.

        Raises:
            ConfigError: an unknown key, a wrong type, an unreadable defaults file, or an API
                key written in the config.
        """
        args = dict(args or {})
        access = args.get("access")
        for where, section in (("", args), ("access.", access if isinstance(access, Mapping) else {})):
            for name in section:
                if str(name).lower() in LITERAL_KEY_NAMES:
                    raise ConfigError(
                        f"{where}{name}: API keys are never written in the config (it is committed, and "
                        f"`serve status` shows it); name an environment variable with access.api_keys_env "
                        f"or a file with access.api_keys_file")
        parsed = from_dict(cls, args)
        if parsed.defaults_file:
            try:
                parsed.defaults = load_config(SamplingSettings, parsed.defaults_file)
            except ConfigError as err:
                raise ConfigError(f"defaults_file {parsed.defaults_file}: {err}") from None
        return parsed


@dataclass
class ModelUserConfig:
    """The model deployment's `user_config`: applied to running replicas by a redeploy."""

    max_batch_size: int = 8
    """Most requests generated together as one CFG batch."""
    batch_wait_timeout_s: float = 0.05
    """How long the first request of a batch waits for others to join it."""
    registry_poll_s: float = 30.0
    """For models:/name@alias: how often to check whether the alias moved (0: never); a moved
    alias loads the new version and swaps it in between batches."""

    def __post_init__(self) -> None:
        check_positive(self, "max_batch_size")
        check_non_negative(self, "batch_wait_timeout_s", "registry_poll_s")

    @classmethod
    def parse(cls, user_config: Mapping[str, Any] | None) -> "ModelUserConfig":
        return from_dict(cls, dict(user_config or {}))
