"""The CFG sweep: generation-only trials over sampling settings, one checkpoint.

Each trial loads the checkpoint, generates the held-out prompt set (text-to-image and edit
requests) with its cell's `cfg_weight` / `cfg_weight2` / `temperature` (and any other sampling
field in the grid), scores the images with CLIP-T and CLIP-I (`janus_lab.evaluation`) and logs
them, with a contact sheet, to its MLflow child run. A `models:/name@alias` checkpoint is
pinned to the version the alias points at when the sweep starts, so every trial scores the
same weights. The best cell is written as a flat YAML of request fields, which the server
reads as its sampling defaults (`serve/config.yaml`: `args.defaults_file`). What the settings
do: docs/design.md, "Classifier-free guidance", "Sweeps".
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import yaml

from janus_lab.storage import is_s3_uri
from janus_lab.sweeps.config import WORLD_SWEEP_METRICS, CfgSweepConfig
from janus_lab.sweeps.grid import cell_label, grid_cells
from janus_lab.sweeps.runner import RUN_ID_METRIC, SweepError, SweepOutcome, SweepSpec, TrialResources
from janus_lab.sweeps.runner import open_trial_run, reported_earlier, run_sweep
from janus_lab.tracking import check_tracking_server, resolve_tracking_uri

CFG_METRICS = {"clip_t": "max", "clip_t_edit": "max", "clip_i": "max"}


@dataclasses.dataclass
class CfgSweepOutcome:
    """A finished CFG sweep: the Tune/MLflow outcome and where the best setting was written."""

    sweep: SweepOutcome
    best_settings_path: Path | None
    clip_label: str


def pin_model(uri: str, tracking_uri: str) -> str:
    """The checkpoint every trial loads, checked to exist before any trial starts.

    Returns:
        `models:/name/<version>` for a registry URI (the alias's version now), an absolute path
        for a local folder, the URI itself for `s3://`, `debug` and `mini`.

    Raises:
        SweepError: the registered model, alias, version, folder or prefix does not exist.
    """
    from mlflow import MlflowClient

    from janus_lab.generation.loading import BUILT_IN_MODELS, ModelSourceError, registered_version
    from janus_lab.model.weights import resolve_checkpoint

    if uri in BUILT_IN_MODELS:
        return uri
    try:
        version = registered_version(uri, MlflowClient(tracking_uri))
    except ModelSourceError as err:
        raise SweepError(f"model={uri}: {err}") from None
    if version is not None:
        return version.uri
    if is_s3_uri(uri):
        from janus_lab.storage import s3_filesystem, strip_scheme

        if not s3_filesystem().exists(f"{strip_scheme(uri).rstrip('/')}/config.json"):
            raise SweepError(f"model={uri} holds no config.json: not a Hugging Face checkpoint prefix")
        return uri
    try:
        return str(resolve_checkpoint(os.path.abspath(uri)))
    except (FileNotFoundError, ValueError) as err:
        raise SweepError(f"model={uri}: {err}") from None


def read_prompt_set(path: str, first_seed: int) -> list:
    """The held-out requests of a JSONL file (input images read as bytes; line i gets seed first_seed + i).

    Raises:
        SweepError: a missing file or a bad line.
    """
    from janus_lab.generation.offline import read_request_file
    from janus_lab.generation.requests import GenerationRequestError

    if not Path(path).is_file():
        raise SweepError(f"prompts={path} does not exist; give a JSONL file of held-out requests")
    try:
        return read_request_file(path, first_seed=first_seed)
    except GenerationRequestError as err:
        raise SweepError(f"prompts={path}: {err}") from None


def check_cells(cfg: CfgSweepConfig) -> None:
    """Every cell's settings pass the request checks (a negative weight fails here, not in a trial).

    Raises:
        SweepError: naming the cell and the field.
    """
    from janus_lab.generation.requests import GenerationLimits, GenerationRequest, GenerationRequestError, check_sampling

    for cell in grid_cells(cfg.grid):
        try:
            check_sampling(GenerationRequest("check", **cell), GenerationLimits())
        except (GenerationRequestError, TypeError) as err:
            raise SweepError(f"grid cell {cell_label(cell)}: {err}") from None


def run_cfg_sweep(cfg: CfgSweepConfig, resume: bool = False) -> CfgSweepOutcome:
    """Runs (or continues) the CFG sweep on the Ray cluster and writes the best setting.

    Raises:
        SweepError: a checkpoint, alias, CLIP folder or prompt file that does not exist, or a
            bad grid value, or a tracking server that does not answer; before any trial starts.
    """
    from ray import tune

    from janus_lab.evaluation.clip import RANDOM_CLIP_NOTE, check_clip_source, is_random_clip

    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_tracking_server(tracking_uri, error=SweepError)
    model = pin_model(cfg.model, tracking_uri)
    requests = read_prompt_set(cfg.prompts, cfg.seed)
    check_cells(cfg)
    targets = None
    if cfg.scorer == "world":
        from janus_lab.miniature.world import read_targets

        try:
            targets = read_targets(cfg.prompts)
        except FileNotFoundError as err:
            raise SweepError(str(err)) from None
        if len(targets) != len(requests):
            raise SweepError(f"{cfg.prompts} has {len(requests)} requests but targets.jsonl {len(targets)} records")
        clip_model, random_clip, clip_label = "", False, "the miniature world's exact scorer"
        metrics = {m: "max" for m in WORLD_SWEEP_METRICS}
    else:
        clip_model = cfg.clip_model if cfg.clip_model == "debug" or is_s3_uri(cfg.clip_model) \
            else os.path.abspath(cfg.clip_model)
        try:
            check_clip_source(clip_model)
        except FileNotFoundError as err:
            raise SweepError(str(err)) from None
        random_clip = is_random_clip(clip_model)
        clip_label = RANDOM_CLIP_NOTE if random_clip else f"CLIP {cfg.clip_model}"
        metrics = CFG_METRICS

    def best_files(best: dict[str, Any]) -> dict[str, str]:
        return {"best_settings.yaml": best_settings_yaml(cfg, model, best, clip_label)}

    spec = SweepSpec(
        name=cfg.name, kind="cfg_sweep", grid=cfg.grid, metric=cfg.metric, mode=cfg.mode,
        table_metrics=[m for m in metrics if m != cfg.metric], run=cfg.run, tracking_uri=tracking_uri,
        experiment=cfg.tracking.experiment,
        params={"model": model, "model_requested": cfg.model, "prompts": cfg.prompts, "clip_model": cfg.clip_model,
                "random_test_clip": random_clip, "scorer": cfg.scorer, "grid": json.dumps(cfg.grid),
                "metric": cfg.metric,
                "parallel_size": cfg.parallel_size, "seed": cfg.seed},
        heatmap_metrics={m: d for m, d in metrics.items() if m != cfg.metric},
        note=RANDOM_CLIP_NOTE if random_clip else "", best_files=best_files,
    )

    def make_trainable(parent_run_id: str):
        return tune.with_parameters(cfg_trial, grid_keys=list(cfg.grid), requests=requests, model_uri=model,
                                    clip_model=clip_model, targets=targets, parallel_size=cfg.parallel_size,
                                    batch_images=cfg.batch_images, parent_run_id=parent_run_id,
                                    tracking_uri=tracking_uri, mlflow_experiment=cfg.tracking.experiment)

    resources = TrialResources(reserved={"CPU": cfg.run.trial_cpus, "GPU": cfg.run.trial_gpus})
    outcome = run_sweep(spec, make_trainable, resources, resume)
    path = None
    if outcome.best is not None:
        path = Path(cfg.best_settings_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(best_settings_yaml(cfg, model, outcome.best, clip_label))
    return CfgSweepOutcome(sweep=outcome, best_settings_path=path, clip_label=clip_label)


def best_settings_yaml(cfg: CfgSweepConfig, model: str, best: dict[str, Any], clip_label: str) -> str:
    """The best cell as a flat YAML of request fields, with where it came from in comments."""
    settings = {key: best[key] for key in cfg.grid}
    header = [f"Best sampling setting of CFG sweep {cfg.name} on {model}: {cfg.metric} {best[cfg.metric]:.6g} "
              f"({cfg.mode}) over {len(grid_cells(cfg.grid))} settings, {clip_label}.",
              "Serve with it: serve/config.yaml args.defaults_file: <this file>."]
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(settings, sort_keys=False)


def cfg_trial(config: dict[str, Any], *, grid_keys: list[str], requests: list, model_uri: str, clip_model: str,
              parallel_size: int, batch_images: int, parent_run_id: str, tracking_uri: str,
              mlflow_experiment: str, targets: list | None = None) -> None:
    """One Tune trial: generates the prompt set with its cell's settings and scores it."""
    from ray import tune

    cell = {key: config[key] for key in grid_keys}
    if reported_earlier(tracking_uri, mlflow_experiment, parent_run_id, cell):
        return
    run = open_trial_run(tracking_uri, mlflow_experiment, parent_run_id, cell,
                         params={**cell, "model": model_uri, "clip_model": clip_model, "parallel_size": parallel_size})
    try:
        metrics, sheet, clip_label = _score_cell(cell, requests, model_uri, clip_model, parallel_size, batch_images,
                                                 tracking_uri, targets)
        run.log_metrics(metrics, step=0)
        run.log_image(sheet, "samples/contact_sheet.png")
        run.set_tags({"clip": clip_label})
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    print(f"{cell_label(cell)}: {json.dumps(metrics)} ({clip_label})", flush=True)
    tune.report(metrics | {RUN_ID_METRIC: run.run_id})


def _score_cell(cell: dict, requests: list, model_uri: str, clip_model: str, parallel_size: int, batch_images: int,
                tracking_uri: str, targets: list | None = None):
    import mlflow
    from PIL import Image

    from janus_lab.evaluation.clip import ClipScorer
    from janus_lab.evaluation.generation_scores import score_generation, with_settings
    from janus_lab.generation import GenerationEngine, GenerationLimits
    from janus_lab.generation.loading import load_generation_model
    from janus_lab.generation.offline import contact_sheet, resolve_device_and_dtype

    mlflow.set_tracking_uri(tracking_uri)  # a models:/ checkpoint downloads through it
    device, dtype = resolve_device_and_dtype("auto", "auto")
    bundle = load_generation_model(model_uri, device=device, dtype=dtype)
    limits = GenerationLimits(max_parallel_size=parallel_size, max_batch_images=max(batch_images, parallel_size))
    engine = GenerationEngine.from_bundle(bundle, limits=limits)
    if targets is not None:
        return _score_world_cell(engine, cell, requests, targets, parallel_size, limits.max_batch_images)
    scorer = ClipScorer.load(clip_model, device)
    scored = with_settings(requests, cell, parallel_size)
    scores = score_generation(engine, scored, scorer, batch_images=limits.max_batch_images)
    for index, reason in scores.refused.items():  # the same prompts in every cell, so cells stay comparable
        print(f"{cell_label(cell)}: prompt {index} refused ({reason})", flush=True)
    rows = [[Image.open(io.BytesIO(x)) if isinstance(x, bytes) else x for x in request.input_images] + result.images
            for request, result in zip(scored, scores.results) if result is not None]  # None: refused
    return scores.metrics, contact_sheet(rows, bundle.image_size), scorer.label


def _score_world_cell(engine, cell: dict, requests: list, targets: list, parallel_size: int, batch_images: int):
    """A cell scored by the miniature world's exact scorer: prompt following and edit success."""
    from janus_lab.evaluation.generation_scores import with_settings
    from janus_lab.generation.offline import contact_sheet
    from janus_lab.miniature.score import score_sample, summarise, world_metrics

    scored = with_settings(requests, cell, parallel_size)
    scores, rows = [], []
    for index, result in engine.generate_in_batches(scored, max_images=batch_images):
        scores.extend(score_sample(targets[index], image) for image in result.images)
        rows.append([targets[index].output_image(), *targets[index].input_images(), *result.images])
    return world_metrics(summarise(scores)), contact_sheet(rows, engine.image_size), "the miniature world's exact scorer"
