"""The masking-ratio ablation (docs/design.md, "Masking", "Sweeps"): one fine-tuning run per grid cell.

Each trial is a Tune function that runs the fine-tuning job's `TorchTrainer` (Ray Train V2
refuses `Tuner(TorchTrainer)`) with Tune's `TuneReportCallback`, so the training metrics reach
Tune, and logs into its own MLflow child run. A trial's Ray Train run is named
`<sweep>-<cell>`, so a trial restarted by `--resume` continues from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from janus_lab.config import ConfigError, from_dict, load_config, to_dict
from janus_lab.storage import is_s3_uri
from janus_lab.sweeps.config import MaskingAblationConfig
from janus_lab.sweeps.grid import cell_label, cell_slug, grid_cells
from janus_lab.sweeps.runner import RUN_ID_METRIC, SweepError, SweepOutcome, SweepSpec, TrialResources, run_sweep
from janus_lab.sweeps.runner import open_trial_run, reported_earlier
from janus_lab.tracking import check_tracking_server, resolve_tracking_uri
from janus_lab.train.config import ExperimentConfig


def trial_experiments(cfg: MaskingAblationConfig, tracking_uri: str) -> dict[str, ExperimentConfig]:
    """Every cell's fine-tuning config (by cell slug), checked as the fine-tuning job checks it.

    A trial's config is the base experiment, then the sweep's overrides, then the cell; it is
    named `<sweep>-<cell>` and logs to the sweep's MLflow experiment. Local paths are made
    absolute, since Tune runs trials in their own folders.

    Raises:
        SweepError: the base config, an override or a cell value is invalid, or the data or
            weights cannot be used (the fine-tuning job's preflight); before any trial runs.
    """
    from janus_lab.train.launch import PreflightError, preflight

    shared = [f"{key}={json.dumps(value)}" for key, value in cfg.overrides.items()]
    experiments = {}
    for cell in grid_cells(cfg.grid):
        label = cell_label(cell)
        own = [f"{key}={json.dumps(value)}" for key, value in cell.items()]
        own += [f"name={cfg.name}-{cell_slug(cell)}", f"tracking.experiment={json.dumps(cfg.tracking.experiment)}",
                f"tracking.tracking_uri={json.dumps(tracking_uri)}", f"tracking.run_name={json.dumps(label)}"]
        try:
            experiment = _absolute_paths(load_config(ExperimentConfig, cfg.experiment, shared + own))
            preflight(experiment)
        except (ConfigError, PreflightError) as err:
            raise SweepError(f"grid cell {label}: {err}") from None
        experiments[cell_slug(cell)] = experiment
    return experiments


def trial_resources(cfg: MaskingAblationConfig, experiments: list[ExperimentConfig]) -> TrialResources:
    """The trial's own process, plus its train workers and Ray Data headroom (the largest cell's)."""
    from janus_lab.train.launch import scaling_config

    beside: dict[str, float] = {}
    for experiment in experiments:
        need = dict(scaling_config(experiment).total_resources)
        need["CPU"] = need.get("CPU", 0.0) + cfg.data_cpus
        beside = {k: max(beside.get(k, 0.0), need.get(k, 0.0)) for k in set(beside) | set(need)}
    return TrialResources(reserved={"CPU": cfg.run.trial_cpus, "GPU": cfg.run.trial_gpus}, beside=beside)


def run_masking_ablation(cfg: MaskingAblationConfig, resume: bool = False) -> SweepOutcome:
    """Runs (or continues) the ablation on the Ray cluster; see `janus_lab.sweeps.runner`.

    Raises:
        SweepError: bad grid values, configs, data or resources, or a tracking server that
            does not answer; before any trial starts.
    """
    from ray import tune

    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_tracking_server(tracking_uri, error=SweepError)
    experiments = trial_experiments(cfg, tracking_uri)
    spec = SweepSpec(
        name=cfg.name, kind="masking_ablation", grid=cfg.grid, metric=cfg.metric, mode=cfg.mode,
        table_metrics=list(cfg.table_metrics), run=cfg.run, tracking_uri=tracking_uri,
        experiment=cfg.tracking.experiment,
        params={"experiment": cfg.experiment, "grid": json.dumps(cfg.grid), "metric": cfg.metric, "mode": cfg.mode,
                **{f"overrides.{k}": v for k, v in cfg.overrides.items()}},
    )
    plain = {slug: to_dict(experiment) for slug, experiment in experiments.items()}

    def make_trainable(parent_run_id: str):
        return tune.with_parameters(masking_trial, grid_keys=list(cfg.grid), experiments=plain,
                                    parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                                    mlflow_experiment=cfg.tracking.experiment)

    return run_sweep(spec, make_trainable, trial_resources(cfg, list(experiments.values())), resume)


def masking_trial(config: dict[str, Any], *, grid_keys: list[str], experiments: dict[str, dict], parent_run_id: str,
                  tracking_uri: str, mlflow_experiment: str) -> None:
    """One Tune trial: fine-tunes its cell's config, or reports the run it finished earlier."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from janus_lab.train.launch import run_finetune

    cell = {key: config[key] for key in grid_keys}
    if reported_earlier(tracking_uri, mlflow_experiment, parent_run_id, cell):
        return
    experiment = from_dict(ExperimentConfig, experiments[cell_slug(cell)])
    run = open_trial_run(tracking_uri, mlflow_experiment, parent_run_id, cell, params={})  # run_finetune logs them
    result = run_finetune(experiment, run=run, callbacks=[TuneReportCallback()])
    tune.report(dict(result.metrics or {}) | {RUN_ID_METRIC: run.run_id})


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    def absolute(path: str | None) -> str | None:
        return path if path is None or is_s3_uri(path) else os.path.abspath(path)

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, uri=absolute(cfg.data.uri)),
        train=dataclasses.replace(cfg.train, storage_path=absolute(cfg.train.storage_path)),
        model=dataclasses.replace(cfg.model, weights=absolute(cfg.model.weights)),
    )
