"""Ray Tune plumbing shared by the masking ablation and the CFG sweep.

- Resources: each trial reserves its own process (`trial_cpus`, `trial_gpus`) through Tune;
  what it starts beside it (Ray Train workers, Ray Data reads) is counted too, and the number
  of concurrent trials is capped so that all running trials' needs fit the cluster at once.
  A trial can then never sit waiting for workers that other trials' drivers keep from it.
- No scheduler: every cell of the grid runs to the end (an early-stopped Train V2 trial leaves
  its workers' placement group behind; see docs/platform-notes.md, "Ray Tune").
- MLflow: one parent run per sweep (tag `sweep_path`, found again by `--resume`), one child run
  per trial (tags `mlflow.parentRunId` and `sweep_cell`). A trial that a resumed sweep starts
  again logs into its child run; one whose child run already FINISHED reports that run's
  metrics and does no work, whatever Tune's last saved state says.
- A failed trial (its node lost, a train worker killed) is started again by Tune up to
  `run.max_failures` times; its Ray Train run continues from its latest checkpoint and logs into
  the same child run, so only the steps after that checkpoint are trained again.
- Resume is Tune's: `Tuner.restore` keeps finished trials and reruns unfinished and errored ones.
- At the end the parent gets the results table (CSV, Markdown) and heatmaps.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from janus_lab.cluster import connect_ray, ray_storage
from janus_lab.sweeps.config import SweepRunConfig
from janus_lab.sweeps.grid import cell_label, cell_slug, grid_cells
from janus_lab.sweeps.results import ResultsTable
from janus_lab.tracking import GIT_COMMIT_TAG, PARENT_RUN_TAG, RunLogger, find_run, git_commit

SWEEP_PATH_TAG = "sweep_path"
SWEEP_CELL_TAG = "sweep_cell"
RUN_ID_METRIC = "mlflow_run_id"
"""Key of the child run's id in what a trial reports to Tune (not an MLflow metric)."""


class SweepError(ValueError):
    """A sweep that cannot start; nothing ran. The message says what to change."""


@dataclass
class TrialResources:
    """What one running trial holds."""

    reserved: dict[str, float]
    """Reserved by Tune for the trial's own process."""
    beside: dict[str, float] = field(default_factory=dict)
    """Started by the trial outside that reservation: train workers, headroom for Ray Data reads."""

    @property
    def total(self) -> dict[str, float]:
        """Everything one running trial holds (resources it needs none of left out)."""
        keys = sorted(set(self.reserved) | set(self.beside))
        return {k: self.reserved.get(k, 0.0) + self.beside.get(k, 0.0) for k in keys
                if self.reserved.get(k, 0.0) + self.beside.get(k, 0.0) > 0}


def plan_concurrency(requested: int, resources: TrialResources, cluster: Mapping[str, float]) -> int:
    """How many trials may run at once: the requested number, or fewer if the cluster cannot
    hold that many trials' resources together.

    Raises:
        SweepError: the cluster cannot hold even one trial.
    """
    fits = requested
    for name, need in resources.total.items():
        if need > 0:
            fits = min(fits, math.floor(cluster.get(name, 0.0) / need + 1e-9))
    if fits < 1:
        total, reserved = _resources_text(resources.total), _resources_text(resources.reserved)
        raise SweepError(f"one trial needs {total} ({reserved} for the trial itself, "
                         f"{_resources_text(resources.beside)} beside it) but the cluster has "
                         f"{_resources_text(cluster)}; lower the per-trial resources or add nodes")
    return fits


@dataclass
class SweepSpec:
    """One sweep, as `run_sweep` runs it."""

    name: str
    kind: str
    """`masking_ablation` or `cfg_sweep` (a tag on the parent run)."""
    grid: dict[str, list[Any]]
    metric: str
    mode: Literal["min", "max"]
    table_metrics: list[str]
    run: SweepRunConfig
    tracking_uri: str
    experiment: str
    params: dict[str, Any]
    """Params of the parent run."""
    heatmap_metrics: dict[str, Literal["min", "max"]] = field(default_factory=dict)
    """Metrics with a heatmap besides `metric`, each with its direction."""
    note: str = ""
    """A line printed with the table and written under the heatmap titles."""
    best_files: Callable[[dict[str, Any]], dict[str, str]] | None = None
    """Best row -> extra files (name -> text) for the parent's `results/` (the CFG sweep's settings)."""


@dataclass
class SweepOutcome:
    """What a finished sweep left: the table, the best row and the parent run."""

    table: ResultsTable
    best: dict[str, Any] | None
    parent_run_id: str
    parent_url: str
    errors: int


def experiment_dir(run: SweepRunConfig, name: str) -> tuple[str, str, Any]:
    """(Tune storage_path, experiment path, pyarrow filesystem or None) of a sweep."""
    storage, fs = ray_storage(run.storage_path)
    return storage, f"{storage}/{name}", fs


def run_sweep(spec: SweepSpec, make_trainable: Callable[[str], Any], resources: TrialResources,
              resume: bool) -> SweepOutcome:
    """Runs (or, with `resume`, continues) every cell of the grid as a Tune trial.

    Args:
        spec: the sweep.
        make_trainable: parent run id -> the Tune function trainable (parameters bound).
        resources: what one trial holds.
        resume: continue the sweep's Tune experiment instead of starting a new one.

    Raises:
        SweepError: nothing to resume, a sweep of that name already exists (without `resume`),
            its parent run is gone, or the cluster cannot hold one trial.
    """
    import ray
    from ray import tune
    from ray.tune import Tuner

    storage, path, fs = experiment_dir(spec.run, spec.name)
    exists = Tuner.can_restore(path, storage_filesystem=fs)
    if resume and not exists:
        raise SweepError(f"nothing to resume: no Tune experiment at {path} (run without --resume to start it)")
    if exists and not resume:
        raise SweepError(f"sweep {spec.name!r} already has state at {path}: add --resume to continue it, "
                         "or set another name")
    connect_ray()
    concurrency = plan_concurrency(spec.run.max_concurrent_trials, resources, ray.cluster_resources())
    parent = _parent_run(spec, path, resume)
    cells = grid_cells(spec.grid)
    print(f"sweep {spec.name}: {len(cells)} trials, at most {concurrency} at once, each holding "
          f"{_resources_text(resources.total)}; MLflow parent run {parent.run_url()}", flush=True)

    trainable = tune.with_resources(make_trainable(parent.run_id),
                                    tune.PlacementGroupFactory([{k: v for k, v in resources.reserved.items() if v}]))
    if resume:
        tuner = Tuner.restore(path, trainable, storage_filesystem=fs, resume_unfinished=True, restart_errored=True)
    else:
        tuner = Tuner(
            trainable,
            param_space={key: tune.grid_search(values) for key, values in spec.grid.items()},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=spec.name, storage_path=storage, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=spec.run.max_failures), verbose=1),
        )
    results = tuner.fit()
    trials, errors = _table(spec, cells, results)
    table = trials.aggregated()  # cells repeated over seeds are ranked on their mean
    best = table.best(spec.metric, spec.mode)
    _finish_parent(spec, parent, trials, table, best, errors)
    return SweepOutcome(table=table, best=best, parent_run_id=parent.run_id, parent_url=parent.run_url(),
                        errors=errors)


def _trial_dirname(trial) -> str:
    return f"{cell_slug(trial.config)}-{trial.trial_id}"


def _parent_run(spec: SweepSpec, path: str, resume: bool) -> RunLogger:
    if resume:
        found = find_run(spec.tracking_uri, spec.experiment, {SWEEP_PATH_TAG: path})
        if found is None:
            raise SweepError(f"the MLflow parent run of sweep {spec.name!r} (tag {SWEEP_PATH_TAG}={path}) is not in "
                             f"experiment {spec.experiment!r} on {spec.tracking_uri}")
        return RunLogger.reopen(spec.tracking_uri, found.info.run_id)
    return RunLogger.open_run(spec.tracking_uri, spec.experiment, spec.name, params=spec.params,
                              tags={SWEEP_PATH_TAG: path, "sweep_kind": spec.kind, GIT_COMMIT_TAG: git_commit()})


def _table(spec: SweepSpec, cells: list[dict], results) -> tuple[ResultsTable, int]:
    by_slug = {}
    for result in results:
        by_slug[cell_slug({key: result.config[key] for key in spec.grid})] = result
    table = ResultsTable(params=list(spec.grid), metrics=[spec.metric, *spec.table_metrics])
    errors = 0
    for cell in cells:
        result = by_slug.get(cell_slug(cell))
        metrics = dict(result.metrics or {}) if result is not None else {}
        if result is None:
            status = "not run"
        elif result.error is not None:
            status, errors = f"ERROR ({type(result.error).__name__})", errors + 1
        else:
            status = "done"
        table.add(cell, metrics, status, metrics.get(RUN_ID_METRIC))
    return table, errors


def _finish_parent(spec: SweepSpec, parent: RunLogger, trials: ResultsTable, table: ResultsTable, best: dict | None,
                   errors: int) -> None:
    with tempfile.TemporaryDirectory(prefix="janus-sweep-") as tmp:
        folder = Path(tmp)
        (folder / "results.csv").write_text(trials.to_csv())
        per_trial = f"\n\nPer trial:\n\n{trials.to_markdown()}" if table is not trials else ""
        (folder / "results.md").write_text((f"{spec.note}\n\n" if spec.note else "") + table.to_markdown(best)
                                           + per_trial)
        for metric, mode in ({spec.metric: spec.mode} | spec.heatmap_metrics).items():
            table.save_heatmap(folder / f"heatmap_{metric}.png", metric, mode, spec.note)
        if best is not None and spec.best_files:
            for name, text in spec.best_files(best).items():
                (folder / name).write_text(text)
        for path in sorted(folder.iterdir()):
            parent.log_artifact(path, "results")
    if best is not None:
        parent.log_metrics({f"best_{spec.metric}": best[spec.metric]}, step=0)
        parent.set_tags({"best_cell": cell_label({key: best[key] for key in spec.grid})})
    parent.end("FAILED" if errors else "FINISHED")


def sweep_cli(cls: type, run: Callable[[Any, bool], Any], argv: list[str] | None,
              description: str | None) -> tuple[Any, int]:
    """What a sweep entry point's `main()` does: parse `--config X.yaml [--resume] KEY=VALUE ...`,
    run the sweep, print a refused start as an error.

    Returns:
        (the run's outcome or None, exit status: 0, 1 when a trial failed, 2 when refused).
    """
    import sys

    from janus_lab.config import parse_cli_with_flags

    cfg, flags = parse_cli_with_flags(cls, argv, description=description,
                                      flags={"--resume": "continue the interrupted sweep of this name"})
    try:
        outcome = run(cfg, flags["--resume"])
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return None, 2
    sweep = getattr(outcome, "sweep", outcome)
    print(sweep.table.to_markdown(sweep.best))
    print(f"MLflow parent run: {sweep.parent_url}")
    return outcome, 1 if sweep.errors else 0


# --------------------------------------------------------------------------- inside a trial


def reported_earlier(tracking_uri: str, experiment: str, parent_run_id: str, cell: dict) -> bool:
    """If this cell's child run already FINISHED, reports its metrics to Tune and returns True:
    the trial then does no work (Tune's saved state may predate the end of the trial)."""
    from ray import tune

    found = find_run(tracking_uri, experiment, {PARENT_RUN_TAG: parent_run_id, SWEEP_CELL_TAG: cell_slug(cell)})
    if found is None or found.info.status != "FINISHED":
        return False
    print(f"{cell_label(cell)}: finished before (MLflow run {found.info.run_id}); not run again", flush=True)
    tune.report(dict(found.data.metrics) | {RUN_ID_METRIC: found.info.run_id})
    return True


def open_trial_run(tracking_uri: str, experiment: str, parent_run_id: str, cell: dict,
                   params: Mapping[str, Any]) -> RunLogger:
    """The cell's child run: the one an interrupted attempt left, or a new one."""
    found = find_run(tracking_uri, experiment, {PARENT_RUN_TAG: parent_run_id, SWEEP_CELL_TAG: cell_slug(cell)})
    if found is not None:
        return RunLogger.reopen(tracking_uri, found.info.run_id)
    return RunLogger.open_run(tracking_uri, experiment, cell_label(cell), params=params,
                              tags={SWEEP_CELL_TAG: cell_slug(cell), GIT_COMMIT_TAG: git_commit()},
                              parent_run_id=parent_run_id)


def _resources_text(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "nothing"
