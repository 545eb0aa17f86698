"""What every generation user shares: how codes are sampled, and which model runs where.

One declaration each. A request (`GenerationRequest`), offline generation (`GenerateConfig`),
evaluation, the miniature's evaluation, the server (`ServeArgs` and its `defaults`), the CFG
sweep's grid keys and the engine's per-image settings (`ImageSampling`) all take their fields
from here, so a new setting or a changed default reaches every one of them at once.

Both are keyword-only dataclasses: a subclass keeps its own positional fields (a request's
`prompt`) in front. This module imports nothing heavy; the driver-side config code uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


class SettingError(ValueError):
    """A bad sampling or model setting; `field` names it, the message says what is allowed."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


@dataclass(kw_only=True)
class SamplingSettings:
    """How an image picks its codes (docs/design.md, "Classifier-free guidance")."""

    cfg_weight: float = 5.0
    """Guidance weight w: logits = u + w * (c - u); 1 is no guidance."""
    cfg_weight2: float = 5.0
    """Editing only: weight of the partial (image-only) branch, c = (full + w2 * part) / (1 + w2)."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (argmax)."""
    top_k: int | None = None
    """Sample among the k most likely codes only; null: no limit."""
    top_p: float | None = None
    """Sample from the smallest set of codes holding this much probability; null: no limit."""

    def __post_init__(self) -> None:
        self.check_sampling()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The sampling fields' names (what a CFG sweep's grid may search)."""
        return _SAMPLING_KEYS

    def sampling(self) -> "SamplingSettings":
        """These settings alone, without the subclass's other fields."""
        return SamplingSettings(**self.sampling_dict())

    def sampling_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.keys()}

    def check_sampling(self) -> None:
        """Raises SettingError naming the first bad field (a wrong type, or out of range)."""
        for name in ("cfg_weight", "cfg_weight2"):
            if _number(getattr(self, name), name) < 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        if _number(self.temperature, "temperature") < 0:
            raise SettingError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None:
            if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
                raise SettingError("top_k", f"must be an integer, got {self.top_k!r}")
            if self.top_k < 1:
                raise SettingError("top_k", f"must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < _number(self.top_p, "top_p") <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {self.top_p}")


_SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingSettings))

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16"]


@dataclass(kw_only=True)
class ModelSource:
    """Which model to load, and where and how it runs."""

    model: str
    """Checkpoint folder, `s3://` prefix, `models:/name@alias` (MLflow registry), `mini`, or `debug`."""
    device: Device = "auto"
    """Where to run: cpu, cuda, or auto (cuda when available)."""
    dtype: Dtype = "auto"
    """Weights and compute dtype: float32, bfloat16, or auto (bfloat16 on cuda, float32 on cpu).
    No float16: the released weights are bfloat16 and their activations can overflow it."""
    compile: bool = False
    """CUDA only: static KV cache + torch.compile (CUDA graphs) for the per-token step."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise SettingError("model", "must name a model: a checkpoint folder, s3:// prefix, "
                                        "models:/name@alias, mini or debug")
        for name, allowed in (("device", Device.__args__), ("dtype", Dtype.__args__)):
            if getattr(self, name) not in allowed:
                raise SettingError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(name, f"must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingError(name, f"must be finite, got {value}")
    return float(value)
