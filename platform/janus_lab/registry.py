"""Model registry promotion: a fine-tuning run's export becomes a version of a registered model.

`promote` (what `jobs/promote.py` runs) copies the run's Hugging Face export into the run's
MLflow artifacts under `model/` (through the tracking server, so the registry never points at
a training folder that a later run may overwrite), registers it as a new version of the
registered model, tags the version with where it came from (run id, dataset manifest, git
commit, export) and its `val_*` metrics, and then moves the aliases:

- `challenger` always goes to the promoted version;
- `champion` goes to it when there is no champion yet, when it is strictly better than the
  champion on the configured metric in the configured direction, or when the promotion is
  forced with a reason (stored as the version tags `forced` and `force_reason`).

Every check (run, metric, export, a champion to compare with) happens before anything is
written, so a promotion that fails changes nothing. `models:/<name>@champion` then resolves
through the registry to the artifacts (`janus_lab.generation.loading.resolve_model_uri`).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Literal

from janus_lab.model.adapters import ADAPTER_CONFIG, BASE_FILE
from janus_lab.storage import is_s3_uri, s3_filesystem, strip_scheme
from janus_lab.tracking import GIT_COMMIT_TAG, check_tracking_server, resolve_tracking_uri

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_PATH = "model"
"""Where in the run's artifacts the export is copied; the version's source points there."""
EXPORT_URI_TAG = "export_uri"
DATASET_TAGS = ("dataset_uri", "dataset_fingerprint")
METRIC_TAG_PREFIX = "metric."
"""Version tag `metric.val_nll` = the run's val_nll when it was promoted."""


class PromotionError(ValueError):
    """A promotion that cannot happen; nothing was changed. The message says what to fix."""


@dataclasses.dataclass
class PromoteConfig:
    """One promotion: which run, into which registered model, gated on which metric."""

    run_id: str
    """MLflow run id of a finished fine-tuning run (it has the `export_uri` tag)."""
    name: str = "janus-4o"
    """Registered model; created on its first promotion."""
    metric: str = "val_nll"
    """Run metric that decides whether the new version replaces the champion."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Better means lower (minimize, e.g. val_nll) or higher (maximize, e.g. val_accuracy)."""
    force: bool = False
    """Move champion to the new version whatever the metric says; needs `reason`."""
    reason: str | None = None
    """Why a forced promotion is forced; stored on the version as `force_reason`."""
    tracking_uri: str | None = None
    """MLflow tracking and registry server; None = MLFLOW_TRACKING_URI from the environment."""

    def __post_init__(self) -> None:
        for name in ("run_id", "name", "metric"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"{name} must be a non-empty string")
        has_reason = bool(self.reason and self.reason.strip())
        if self.force and not has_reason:
            raise ValueError("reason must say why when force=true (it is stored on the version as force_reason)")
        if self.reason is not None and not self.force:
            raise ValueError("reason is only used with force=true; a gated promotion is explained by its metric")


@dataclasses.dataclass(frozen=True)
class VersionScore:
    """A registered version and its value of the promotion metric."""

    version: str
    value: float


@dataclasses.dataclass
class PromotionResult:
    """What a promotion changed."""

    name: str
    version: str
    """The promoted run's version (new, or the run's existing version when it was promoted before)."""
    run_id: str
    source: str
    """Artifact URI the version points at."""
    metric: str
    value: float
    previous_champion: VersionScore | None
    champion: str
    """Version the champion alias points at now."""
    newly_registered: bool
    forced: bool
    decision: str
    """Why champion moved or stayed, in words."""

    def summary(self) -> str:
        """What changed and why, as the job prints it."""
        registered = (f"registered run {self.run_id} as {self.name} v{self.version} ({self.source})"
                      if self.newly_registered else
                      f"run {self.run_id} is already registered as {self.name} v{self.version}")
        return "\n".join([registered, self.decision, f"load it with models:/{self.name}@{CHAMPION}"
                          if self.champion == self.version else f"try it with models:/{self.name}@{CHALLENGER}"])


def is_better(value: float, than: float, direction: str) -> bool:
    """Whether `value` is strictly better than `than` when better means `direction`."""
    return value < than if direction == "minimize" else value > than


def promote(cfg: PromoteConfig) -> PromotionResult:
    """Registers a run's export as a version of `cfg.name` and moves the aliases (module docstring).

    Args:
        cfg: the run, the registered model, the metric and direction, and force/reason.

    Returns:
        The version, the champion before and after, and the decision in words.

    Raises:
        PromotionError: the tracking server does not answer, the run does not exist or was
            deleted, it lacks the metric or the `export_uri` tag, the export holds no Hugging
            Face checkpoint, or the champion has no value of the metric to compare with
            (force=true settles that). Raised before anything is changed.
    """
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_server(tracking_uri, error=PromotionError)
    client = MlflowClient(tracking_uri)
    run = _get_run(client, cfg.run_id, tracking_uri)
    value = _run_metric(run, cfg.metric)
    # A run promoted before keeps its version (a rollback); its export may be gone by now, but
    # the version's artifacts are the run's own copy.
    existing = _version_of_run(client, cfg.name, cfg.run_id)
    if existing is None:
        export_uri = run.data.tags.get(EXPORT_URI_TAG)
        if not export_uri:
            raise PromotionError(f"run {cfg.run_id} has no {EXPORT_URI_TAG} tag: it did not finish its Hugging "
                                 "Face export (fine-tuning sets the tag after writing the export)")
        export_files = list_export(export_uri)
    previous = _champion(client, cfg.name, cfg.metric)
    if previous is not None and math.isnan(previous.value) and not cfg.force:
        raise PromotionError(f"champion {cfg.name} v{previous.version} has no {cfg.metric} (version tag "
                             f"{METRIC_TAG_PREFIX}{cfg.metric} or run metric) to compare with; gate on another "
                             "metric, or move champion with force=true reason=...")

    # Every check passed: from here on the registry changes.
    if existing is None:
        source = _copy_export_to_run(client, run, export_uri, export_files)
        tags = _version_tags(run, export_uri, cfg)
        _ensure_registered_model(client, cfg.name)
        version = client.create_model_version(cfg.name, source, run_id=cfg.run_id, tags=tags).version
        newly_registered = True
    else:
        version, source, newly_registered = existing.version, existing.source, False
    version = str(version)

    decision, champion = _decide(cfg, version, value, previous)
    client.set_registered_model_alias(cfg.name, CHALLENGER, version)
    if champion == version:
        client.set_registered_model_alias(cfg.name, CHAMPION, version)
    if cfg.force:
        client.set_model_version_tag(cfg.name, version, "forced", "true")
        client.set_model_version_tag(cfg.name, version, "force_reason", cfg.reason.strip())
    client.update_model_version(cfg.name, version, description=decision)
    return PromotionResult(name=cfg.name, version=version, run_id=cfg.run_id, source=source, metric=cfg.metric,
                           value=value, previous_champion=previous, champion=champion,
                           newly_registered=newly_registered, forced=cfg.force, decision=decision)


def _decide(cfg: PromoteConfig, version: str, value: float, previous: VersionScore | None) -> tuple[str, str]:
    """(the decision in words, the champion version after it)."""
    this = f"{cfg.name} v{version} ({cfg.metric} {_metric_text(value)})"
    if previous is None:
        return f"{this}: no champion yet: champion -> v{version}; v{version} is challenger", version
    if previous.version == version:
        return f"{this} is already champion: champion stays v{version}; v{version} is challenger", version
    other = f"champion v{previous.version} ({cfg.metric} {_metric_text(previous.value)})"
    if cfg.force:
        return (f"{this} forced over {other}: champion -> v{version} (reason: {cfg.reason.strip()}); "
                f"v{version} is challenger"), version
    if is_better(value, previous.value, cfg.direction):
        return f"{this} beats {other} ({cfg.direction}): champion -> v{version}; v{version} is challenger", version
    return (f"{this} does not beat {other} ({cfg.direction}): champion stays v{previous.version}; "
            f"v{version} is challenger"), previous.version


def _metric_text(value: float) -> str:
    # Enough digits that two values shown as equal are (nearly) equal, few enough to read.
    return f"{value:.6g}"


# --------------------------------------------------------------------------- checks (read only)


def _get_run(client, run_id: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PromotionError(f"run_id={run_id}: no such run on {tracking_uri}") from None
        raise PromotionError(f"run_id={run_id}: could not read the run from {tracking_uri}: {err}") from None
    if run.info.lifecycle_stage == "deleted":
        raise PromotionError(f"run_id={run_id} was deleted; restore it first (`mlflow runs restore`)")
    return run


def _run_metric(run, metric: str) -> float:
    metrics = run.data.metrics
    if metric not in metrics:
        val = sorted(k for k in metrics if k.startswith("val_"))
        raise PromotionError(f"run {run.info.run_id} has no metric {metric!r}; its validation metrics: "
                             f"{', '.join(val) or 'none (was validation off, or did the run not finish?)'}")
    value = float(metrics[metric])
    if not math.isfinite(value):
        raise PromotionError(f"run {run.info.run_id} has {metric}={value}, which cannot be compared")
    return value


def list_export(export_uri: str) -> list[str]:
    """The files of an export (paths relative to it), checked to be a Hugging Face checkpoint or a
    LoRA adapter (PEFT's adapter_config.json and its weights, with the base it belongs to).

    Raises:
        PromotionError: nothing there, or neither config.json nor adapter_config.json with *.safetensors.
    """
    if is_s3_uri(export_uri):
        prefix = strip_scheme(export_uri).rstrip("/")
        files = sorted(key[len(prefix):].lstrip("/") for key in s3_filesystem().find(prefix))
    else:
        root = Path(export_uri)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    if not files:
        raise PromotionError(f"export {export_uri} does not exist (nothing there); was it moved or deleted?")
    has_weights = any(f.endswith(".safetensors") and "/" not in f for f in files)
    is_adapter = ADAPTER_CONFIG in files and BASE_FILE in files
    if not has_weights or ("config.json" not in files and not is_adapter):
        raise PromotionError(f"export {export_uri} is neither a Hugging Face checkpoint folder (config.json and "
                             f"*.safetensors) nor a LoRA adapter ({ADAPTER_CONFIG}, {BASE_FILE} and "
                             f"*.safetensors); it has {', '.join(files[:5])}")
    return files


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _version_of_run(client, name: str, run_id: str):
    """The version of `name` already registered from this run, if any (a re-promotion reuses it)."""
    if _registered_model(client, name) is None:
        return None
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _champion(client, name: str, metric: str) -> VersionScore | None:
    """The champion and its metric value (NaN when it has none), or None without a champion."""
    model = _registered_model(client, name)
    if model is None or CHAMPION not in model.aliases:
        return None
    version = str(model.aliases[CHAMPION])
    return VersionScore(version, _version_metric(client, name, version, metric))


def _version_metric(client, name: str, version: str, metric: str) -> float:
    """The metric as tagged at promotion, else the version's run's latest value, else NaN."""
    from mlflow.exceptions import MlflowException

    model_version = client.get_model_version(name, version)
    tagged = model_version.tags.get(f"{METRIC_TAG_PREFIX}{metric}")
    if tagged is not None:
        return float(tagged)
    if model_version.run_id:
        try:
            return float(client.get_run(model_version.run_id).data.metrics.get(metric, math.nan))
        except MlflowException:
            return math.nan
    return math.nan


# --------------------------------------------------------------------------- changes


def _copy_export_to_run(client, run, export_uri: str, files: list[str]) -> str:
    """Uploads the export into the run's artifacts under `model/`; returns its artifact URI.

    An `s3://` export is staged in a temporary folder first: the tracking server's artifact
    proxy takes uploads, not server-side copies.
    """
    if is_s3_uri(export_uri):
        fs = s3_filesystem()
        prefix = strip_scheme(export_uri).rstrip("/")
        with tempfile.TemporaryDirectory(prefix="janus-promote-") as tmp:
            for relative in files:
                local = Path(tmp) / relative
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{prefix}/{relative}", str(local))
            client.log_artifacts(run.info.run_id, tmp, MODEL_ARTIFACT_PATH)
    else:
        client.log_artifacts(run.info.run_id, export_uri, MODEL_ARTIFACT_PATH)
    return f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"


def _version_tags(run, export_uri: str, cfg: PromoteConfig) -> dict[str, str]:
    tags = {"run_id": run.info.run_id, EXPORT_URI_TAG: export_uri,
            GIT_COMMIT_TAG: run.data.tags.get(GIT_COMMIT_TAG, "unknown"),
            "promotion_metric": cfg.metric, "promotion_direction": cfg.direction}
    tags.update({key: run.data.tags.get(key, "unknown") for key in DATASET_TAGS})
    # An adapter version names the base it only works on (a model URI or a built-in preset).
    tags.update({key: run.data.tags[key] for key in ("export_kind", "adapter_base") if key in run.data.tags})
    for key, value in run.data.metrics.items():
        if key.startswith("val_") or key == cfg.metric:
            tags[f"{METRIC_TAG_PREFIX}{key}"] = repr(float(value))
    return tags


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    if _registered_model(client, name) is not None:
        return
    try:
        client.create_registered_model(
            name, description="Janus-4o-style generator; versions and aliases are managed by jobs/promote.py")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another promotion created it just now
            raise
