"""What the image server is configured with: `args` and `user_config` of `serve/config.yaml`.

`args` (fixed for the life of a deployment) become `ServeArgs`; the model deployment's
`user_config` (changed in place with a redeploy, no restart) becomes `ModelUserConfig`. Both
go through the typed config loader, so a misspelt key fails the deploy naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from janus_lab.config import ConfigError, _check_non_negative, _check_positive, from_dict, load_config
from janus_lab.generation import GenerationLimits


@dataclass
class SamplingDefaults:
    """Sampling settings for the fields a request leaves out (`sweeps/cfg_sweep.py` writes these)."""

    cfg_weight: float = 5.0
    """Guidance weight w of DESIGN.md §2.4."""
    cfg_weight2: float = 5.0
    """Editing: weight of the partial (image-only) branch."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_k: int | None = None
    """Sample among the k most likely codes; null: no limit."""
    top_p: float | None = None
    """Nucleus mass; null: no limit."""

    def __post_init__(self) -> None:
        _check_non_negative(self, "cfg_weight", "cfg_weight2", "temperature")


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
        _check_positive(self, "max_text_tokens", "max_n", "max_input_images", "max_upload_bytes", "max_input_pixels")

    def generation_limits(self, max_batch_size: int) -> GenerationLimits:
        """The engine's limits for batches of up to `max_batch_size` requests."""
        return GenerationLimits(max_text_tokens=self.max_text_tokens, max_parallel_size=self.max_n,
                                max_batch_images=self.max_n * max_batch_size,
                                max_input_images=self.max_input_images, max_input_pixels=self.max_input_pixels)


@dataclass
class ServeArgs:
    """The application's `args` in serve/config.yaml."""

    model: str = "models:/janus-4o@champion"
    """What to serve: models:/name@alias (followed when the alias moves), models:/name/version,
    a checkpoint folder, an s3:// prefix, or `debug` (tiny random model, smoke tests only)."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when the replica has a GPU)."""
    dtype: str = "auto"
    """float32, bfloat16, or auto (bfloat16 on cuda, float32 on cpu)."""
    compile: bool = False
    """Compile the per-token step with CUDA graphs (cuda only; the first batch of each shape is slow)."""
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    """Sampling defaults for fields a request leaves out."""
    defaults_file: str | None = None
    """A YAML of SamplingDefaults fields (the CFG sweep's best setting); overrides `defaults`."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    """Request limits."""

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model must name a model: models:/name@alias, a path or an s3:// prefix")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    @classmethod
    def parse(cls, args: Mapping[str, Any] | None) -> "ServeArgs":
        """`args` from the config file, checked; `defaults_file` is read here.

        Raises:
            ConfigError: an unknown key, a wrong type, or an unreadable defaults file.
        """
        parsed = from_dict(cls, dict(args or {}))
        if parsed.defaults_file:
            try:
                parsed.defaults = load_config(SamplingDefaults, parsed.defaults_file)
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
        _check_positive(self, "max_batch_size")
        _check_non_negative(self, "batch_wait_timeout_s", "registry_poll_s")

    @classmethod
    def parse(cls, user_config: Mapping[str, Any] | None) -> "ModelUserConfig":
        return from_dict(cls, dict(user_config or {}))
