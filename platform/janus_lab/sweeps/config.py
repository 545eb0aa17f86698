"""The sweeps' configs: what `sweeps/masking_ablation.py` and `sweeps/cfg_sweep.py` read (docs/design.md, "Sweeps")."""

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Literal

from janus_lab.config import ConfigError, check_config_key, check_non_negative, check_not_empty, check_positive
from janus_lab.settings import SamplingSettings
from janus_lab.train.config import ExperimentConfig, TrackingConfig

DEFAULT_MASKING_GRID = {"masking.t2i_text_drop": [0.0, 0.1, 0.25], "masking.ti2i_image_drop": [0.0, 0.25, 0.5, 0.75]}
DEFAULT_CFG_GRID = {"cfg_weight": [1.0, 3.0, 5.0, 7.0], "cfg_weight2": [1.0, 3.0, 5.0], "temperature": [0.8, 1.0]}
WORLD_SWEEP_METRICS = ("world_t2i", "world_edit", "world_following", "world_preservation", "world_compose",
                       "world_mean")
"""What a CFG sweep with `scorer: world` reports (`world_mean` averages text-to-image and edit)."""


def _check_grid(grid: Mapping[str, Any], check_key: Callable[[str], None]) -> None:
    """A grid names at least one key, each with a non-empty list of distinct scalar values."""
    if not grid:
        raise ValueError("grid is empty: name at least one key with a list of values, "
                         "e.g. masking.t2i_text_drop: [0.0, 0.1]")
    for key, values in grid.items():
        check_key(key)
        if not values:
            raise ValueError(f"grid.{key} has no values: give at least one")
        if any(isinstance(v, (list, dict)) for v in values):
            raise ValueError(f"grid.{key} must list single values, got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"grid.{key} lists a value twice: {values!r}")


@dataclasses.dataclass
class SweepRunConfig:
    """How a Ray Tune sweep runs its trials and where Tune keeps its state."""

    max_concurrent_trials: int = 1
    """Most trials at once; lowered to what the cluster can hold with every trial's resources."""
    trial_cpus: float = 1.0
    """CPUs reserved for each trial's own process (the Tune function that trains or generates)."""
    trial_gpus: float = 0.0
    """GPUs reserved for each trial's own process (a CFG sweep on GPUs: 1)."""
    storage_path: str = "outputs/sweeps"
    """Local folder or `s3://` prefix for Tune's experiment state; `--resume` continues from it."""
    max_failures: int = 2
    """Times Tune starts a failed trial again (its node lost, a worker killed); it resumes from its last checkpoint."""

    def __post_init__(self) -> None:
        check_positive(self, "max_concurrent_trials", "trial_cpus")
        check_non_negative(self, "trial_gpus", "max_failures")
        check_not_empty(self, "storage_path")


@dataclasses.dataclass
class MaskingAblationConfig:
    """A masking-ratio ablation: `sweeps/masking_ablation.py --config X.yaml` (docs/design.md, "Masking", "Sweeps")."""

    name: str = "masking-ablation"
    """Sweep name: the Tune experiment, the MLflow parent run and the prefix of every trial's run."""
    experiment: str = "jobs/configs/debug.yaml"
    """Fine-tuning config (ExperimentConfig YAML) every trial starts from."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Edits of that config shared by every trial, as dotted keys: `train.max_steps: 100`."""
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MASKING_GRID))
    """Dotted experiment keys -> values; one trial per combination, each run to the end."""
    metric: str = "val_nll"
    """Metric of the results table's heatmap and of the best trial."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (min) or higher (max) `metric` is better."""
    table_metrics: list[str] = dataclasses.field(
        default_factory=lambda: ["val_t2i_nll", "val_ti2i_nll", "val_accuracy", "loss"])
    """Further final metrics shown in the results table."""
    data_cpus: float = 1.0
    """CPUs left free per running trial for its Ray Data reading, which runs outside the trial's reservation."""
    run: SweepRunConfig = dataclasses.field(default_factory=SweepRunConfig)
    """Concurrency, per-trial resources and Tune storage."""
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="janus-4o-sweeps"))
    """MLflow experiment of the parent and child runs (every trial logs there)."""

    def __post_init__(self) -> None:
        check_not_empty(self, "name", "experiment", "metric")
        check_non_negative(self, "data_cpus")
        for key in self.overrides:
            check_config_key(ExperimentConfig, key, "overrides", leaf_only=False)
        _check_grid(self.grid, lambda key: check_config_key(ExperimentConfig, key, "grid"))
        for key in self.grid:
            if key == "name":
                raise ValueError("grid must not set name: every trial is named after the sweep and its cell")
            if key in self.overrides:
                raise ValueError(f"grid and overrides both set {key}; keep it in one of them")


@dataclasses.dataclass
class CfgSweepConfig:
    """A CFG-weight sweep on one checkpoint: `sweeps/cfg_sweep.py --config X.yaml` (docs/design.md, "Sweeps")."""

    name: str = "cfg-sweep"
    """Sweep name: the Tune experiment and the MLflow parent run."""
    model: str = "models:/janus-4o@champion"
    """Checkpoint folder, `s3://` prefix, `models:/name@alias` (pinned to its version at start), or `debug`."""
    prompts: str = "sweeps/prompts/debug.jsonl"
    """Held-out prompt set: JSONL of requests, T2I and edit (`input_images` relative to the file)."""
    clip_model: str = "debug"
    """CLIP folder (Hugging Face layout, local or `s3://`) for CLIP-T / CLIP-I; `debug` = a tiny random CLIP."""
    scorer: Literal["clip", "world"] = "clip"
    """`clip` for real images; `world` for the miniature world: the exact scorer reads every image
    against the targets beside the prompt file (`targets.jsonl`, `jobs/sample_data.py --world
    mini --eval-requests`), and metrics are world_t2i, world_edit, world_following, world_preservation, world_compose."""
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_CFG_GRID))
    """Sampling fields (cfg_weight, cfg_weight2, temperature, top_k, top_p) -> values; one trial each."""
    metric: str = "clip_t"
    """Score that picks the best setting: clip_t (prompt-image) or clip_i (edit input-output); with
    `scorer: world`, one of world_t2i, world_edit, world_following, world_preservation, world_compose, world_mean."""
    mode: Literal["min", "max"] = "max"
    """Whether lower (min) or higher (max) `metric` is better."""
    parallel_size: int = 2
    """Images generated per prompt in every trial."""
    seed: int = 0
    """Seed of prompt i is seed + i, in every trial: settings are compared on the same draws."""
    batch_images: int = 16
    """Images per engine batch."""
    best_settings: str | None = None
    """Where the best setting is written as YAML (the server's `defaults_file`); None:
    outputs/sweeps/<name>/best_settings.yaml."""
    run: SweepRunConfig = dataclasses.field(default_factory=SweepRunConfig)
    """Concurrency, per-trial resources and Tune storage."""
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="janus-4o-sweeps"))
    """MLflow experiment of the parent and child runs."""

    def __post_init__(self) -> None:
        check_not_empty(self, "name", "model", "prompts", "clip_model")
        check_positive(self, "parallel_size", "batch_images")
        check_non_negative(self, "seed")
        metrics = WORLD_SWEEP_METRICS if self.scorer == "world" else ("clip_t", "clip_i")
        if self.metric not in metrics:
            raise ValueError(f"metric must be one of {', '.join(metrics)} with scorer {self.scorer}, "
                             f"got {self.metric!r}")
        _check_grid(self.grid, _check_sampling_key)

    @property
    def best_settings_path(self) -> str:
        """Where the best setting's YAML goes."""
        return self.best_settings or f"outputs/sweeps/{self.name}/best_settings.yaml"


def _check_sampling_key(key: str) -> None:
    keys = SamplingSettings.keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(keys)}"
        raise ConfigError(f"unknown key '{key}' in grid (a CFG sweep searches sampling settings); {hint}")
