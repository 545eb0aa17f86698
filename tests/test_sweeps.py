"""Sweeps without a cluster: grids, configs, errors before any trial, resources, results tables
and heatmaps, best-settings YAML. The Ray Tune runs are in tests/test_sweep_runs.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml
from PIL import Image

from janus_lab.config import ConfigError, load_config
from janus_lab.sweeps.config import CfgSweepConfig, MaskingAblationConfig
from janus_lab.sweeps.grid import cell_label, cell_slug, grid_cells
from janus_lab.sweeps.results import ResultsTable
from janus_lab.sweeps.runner import SweepError, TrialResources, plan_concurrency
from entry_points import run_main
from synthetic_shards import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
DEBUG_SWEEP = REPO / "sweeps" / "configs" / "debug.yaml"
CFG_DEBUG = REPO / "sweeps" / "configs" / "cfg_debug.yaml"


# --------------------------------------------------------------------------- grids and configs


def test_grid_cells_cover_every_combination_in_order():
    cells = grid_cells({"masking.t2i_text_drop": [0.0, 0.1], "masking.ti2i_image_drop": [0.0, 0.5, 0.75]})
    assert len(cells) == 6
    assert cells[0] == {"masking.t2i_text_drop": 0.0, "masking.ti2i_image_drop": 0.0}
    assert cells[1] == {"masking.t2i_text_drop": 0.0, "masking.ti2i_image_drop": 0.5}  # last key fastest
    assert cell_label(cells[1]) == "t2i_text_drop=0.0 ti2i_image_drop=0.5"
    assert cell_slug(cells[1]) == "t2i_text_drop0.0-ti2i_image_drop0.5"
    assert len({cell_slug(c) for c in cells}) == 6


def test_default_masking_grid_is_the_issue_grid():
    grid = MaskingAblationConfig().grid
    assert grid == {"masking.t2i_text_drop": [0.0, 0.1, 0.25], "masking.ti2i_image_drop": [0.0, 0.25, 0.5, 0.75]}
    recipe = load_config(MaskingAblationConfig, REPO / "sweeps" / "configs" / "masking_janus4o_7b.yaml")
    assert recipe.grid == grid and recipe.experiment == "jobs/configs/janus4o_7b.yaml"


@pytest.mark.parametrize("cls, path, override, message", [
    (MaskingAblationConfig, DEBUG_SWEEP, "grid={}", "grid is empty"),
    (MaskingAblationConfig, DEBUG_SWEEP, "grid={masking.t2i_text_dro: [0.0]}", "did you mean 'masking.t2i_text_drop'"),
    (MaskingAblationConfig, DEBUG_SWEEP, "grid={t2i_text_drop: [0.0]}", "did you mean 'masking.t2i_text_drop'"),
    (MaskingAblationConfig, DEBUG_SWEEP, "grid={masking: [0.0]}", "is a section of ExperimentConfig"),
    (MaskingAblationConfig, DEBUG_SWEEP, "grid={masking.t2i_text_drop: []}", "has no values"),
    (MaskingAblationConfig, DEBUG_SWEEP, "grid={masking.t2i_text_drop: [0.1, 0.1]}", "lists a value twice"),
    (MaskingAblationConfig, DEBUG_SWEEP, "grid={name: [a, b]}", "grid must not set name"),
    (MaskingAblationConfig, DEBUG_SWEEP, "overrides={train.lrr: 1}", "did you mean 'train.lr'"),
    (MaskingAblationConfig, DEBUG_SWEEP, "overrides={masking.t2i_text_drop: 0.1}",
     "grid and overrides both set masking.t2i_text_drop"),
    (CfgSweepConfig, CFG_DEBUG, "grid={cfg_weigth: [1.0]}", "did you mean 'cfg_weight'"),
    (CfgSweepConfig, CFG_DEBUG, "grid={}", "grid is empty"),
    (CfgSweepConfig, CFG_DEBUG, "metric=fid", "metric must be one of clip_t, clip_i"),
])
def test_sweep_config_errors_name_the_key(cls, path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cls, path, [override])


def test_dotted_overrides_reach_into_grid_and_overrides():
    cfg = load_config(MaskingAblationConfig, DEBUG_SWEEP,
                      ["overrides.train.max_steps=3", "grid.masking.ti2i_image_drop=[0.25]"])
    assert cfg.overrides["train.max_steps"] == 3 and cfg.overrides["train.num_workers"] == 1
    assert cfg.grid == {"masking.t2i_text_drop": [0.0, 0.25], "masking.ti2i_image_drop": [0.25]}


def test_every_sampling_consumer_takes_the_one_declaration():
    """Requests, offline generation, both evaluations, the server's defaults and the engine's
    per-image settings share SamplingSettings' fields and defaults; the model sources share
    ModelSource's choices (the server once allowed float16 where nothing else did)."""
    import dataclasses

    from janus_lab.evaluation.evaluate import EvaluateConfig
    from janus_lab.generation import GenerationRequest
    from janus_lab.generation.offline import GenerateConfig
    from janus_lab.generation.sampling import ImageSampling
    from janus_lab.miniature.evaluate import EvaluateWorldConfig
    from janus_lab.serving.settings import ServeArgs
    from janus_lab.settings import ModelSource, SamplingSettings, SettingError

    defaults = {f.name: f.default for f in dataclasses.fields(SamplingSettings)}
    assert set(defaults) == set(SamplingSettings.keys()) == {"cfg_weight", "cfg_weight2", "temperature", "top_k", "top_p"}
    for consumer in (GenerationRequest, GenerateConfig, ImageSampling, EvaluateWorldConfig):
        fields = {f.name: f.default for f in dataclasses.fields(consumer)}
        assert {k: fields[k] for k in defaults} == defaults, consumer
    assert ServeArgs().defaults == SamplingSettings()
    for source in (GenerateConfig, EvaluateConfig, ServeArgs):
        assert issubclass(source, ModelSource)
        assert [f.type for f in dataclasses.fields(source) if f.name == "dtype"] == ["Dtype"]
    with pytest.raises(SettingError, match="dtype must be one of auto, float32, bfloat16, got 'float16'"):
        ServeArgs(dtype="float16")
    with pytest.raises(SettingError, match="top_p must be in"):
        SamplingSettings(top_p=1.5)


def test_cli_reports_a_misspelt_grid_key_before_anything_runs():
    rc, _, err = run_main("sweeps/masking_ablation.py", "--config", str(DEBUG_SWEEP),
                                 "grid={masking.t2i_text_drp: [0.0]}")
    assert rc == 2 and "did you mean 'masking.t2i_text_drop'" in err


# --------------------------------------------------------------------------- trial configs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("shards"))


def test_trial_experiments_edit_the_base_config(dataset, tmp_path, monkeypatch):
    from janus_lab.sweeps.masking import trial_experiments, trial_resources

    monkeypatch.chdir(REPO)
    cfg = load_config(MaskingAblationConfig, DEBUG_SWEEP, [f"overrides.data.uri={dataset}",
                                                         "overrides.train.storage_path=runs"])
    experiments = trial_experiments(cfg, "sqlite:///x.db")
    assert len(experiments) == 4
    one = experiments["t2i_text_drop0.25-ti2i_image_drop0.5"]
    assert (one.masking.t2i_text_drop, one.masking.ti2i_image_drop) == (0.25, 0.5)
    assert one.name == "masking-debug-t2i_text_drop0.25-ti2i_image_drop0.5"
    assert one.train.max_steps == 8 and one.train.num_workers == 1 and one.train.lr == 1e-2  # base + overrides
    assert one.train.storage_path == str(REPO / "runs")  # absolute: Tune runs trials in their own folders
    assert one.tracking.experiment == cfg.tracking.experiment and one.tracking.tracking_uri == "sqlite:///x.db"
    resources = trial_resources(cfg, list(experiments.values()))
    assert resources.reserved == {"CPU": 1.0, "GPU": 0.0}
    assert resources.total == {"CPU": 3.0}  # the trial, its one train worker, Ray Data headroom


@pytest.mark.parametrize("overrides, message", [
    (["grid.masking.t2i_text_drop=[0.0, 1.5]"], "grid cell t2i_text_drop=1.5 .*must be in \\[0, 1\\]"),
    (["overrides.data.uri=/nowhere/shards"], "no _manifest.json"),
    (["experiment=jobs/configs/missing.yaml"], "config file not found"),
])
def test_bad_cells_and_configs_fail_before_any_trial(dataset, overrides, message, monkeypatch):
    from janus_lab.sweeps.masking import trial_experiments

    monkeypatch.chdir(REPO)
    cfg = load_config(MaskingAblationConfig, DEBUG_SWEEP, [f"overrides.data.uri={dataset}", *overrides])
    with pytest.raises(SweepError, match=message):
        trial_experiments(cfg, "sqlite:///x.db")


def test_concurrency_keeps_running_trials_within_the_cluster():
    need = TrialResources(reserved={"CPU": 1.0}, beside={"CPU": 2.0})
    assert plan_concurrency(4, need, {"CPU": 6.0}) == 2
    assert plan_concurrency(1, need, {"CPU": 6.0}) == 1
    gpus = TrialResources(reserved={"CPU": 1.0, "GPU": 0.0}, beside={"GPU": 8.0, "CPU": 4.0})
    assert plan_concurrency(4, gpus, {"CPU": 200.0, "GPU": 16.0}) == 2
    with pytest.raises(SweepError, match="one trial needs .*8 GPU.* but the cluster has"):
        plan_concurrency(2, gpus, {"CPU": 64.0, "GPU": 4.0})


# --------------------------------------------------------------------------- CFG sweep inputs


def test_missing_checkpoint_alias_clip_and_prompts_fail_before_any_trial(tmp_path):
    from janus_lab.sweeps.cfg import check_cells, pin_model, read_prompt_set

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert pin_model("debug", tracking) == "debug"
    with pytest.raises(SweepError, match="does not exist"):
        pin_model(str(tmp_path / "no-checkpoint"), tracking)
    with pytest.raises(SweepError, match="models:/janus-4o-nope@champion is not in the MLflow registry"):
        pin_model("models:/janus-4o-nope@champion", tracking)
    with pytest.raises(SweepError, match="does not exist"):
        read_prompt_set(str(tmp_path / "none.jsonl"), 0)
    with pytest.raises(SweepError, match="grid cell cfg_weight=-1.0: cfg_weight: must be >= 0"):
        check_cells(load_config(CfgSweepConfig, CFG_DEBUG, ["grid={cfg_weight: [-1.0, 5.0]}"]))
    rc, _, err = run_main("sweeps/cfg_sweep.py", "--config", str(CFG_DEBUG), f"clip_model={tmp_path / 'no-clip'}")
    assert rc == 2 and "no-clip does not exist" in err


def test_shipped_prompt_set_reads_with_its_edit_images():
    from janus_lab.sweeps.cfg import read_prompt_set

    requests = read_prompt_set(str(REPO / "sweeps" / "prompts" / "debug.jsonl"), first_seed=10)
    tasks = [r.task for r in requests]
    assert "t2i" in tasks and "ti2i" in tasks
    assert [r.seed for r in requests] == list(range(10, 10 + len(requests)))


def test_best_settings_yaml_is_what_the_server_reads(tmp_path):
    from janus_lab.sweeps.cfg import best_settings_yaml

    cfg = load_config(CfgSweepConfig, CFG_DEBUG)
    best = {"cfg_weight": 5.0, "cfg_weight2": 1.0, "temperature": 1.0, "clip_t": 0.25}
    text = best_settings_yaml(cfg, "models:/janus-4o/3", best, "scores from a RANDOM TEST CLIP")
    assert yaml.safe_load(text) == {"cfg_weight": 5.0, "cfg_weight2": 1.0, "temperature": 1.0}
    assert "RANDOM TEST CLIP" in text and "models:/janus-4o/3" in text
    path = tmp_path / "best.yaml"
    path.write_text(text)
    from janus_lab.settings import SamplingSettings

    loaded = load_config(SamplingSettings, path)
    assert (loaded.cfg_weight, loaded.cfg_weight2, loaded.temperature) == (5.0, 1.0, 1.0)


# --------------------------------------------------------------------------- results


def table_2x2() -> ResultsTable:
    table = ResultsTable(params=["masking.t2i_text_drop", "masking.ti2i_image_drop"], metrics=["val_nll", "loss"])
    for i, (t, v) in enumerate([(0.0, 0.0), (0.0, 0.5), (0.25, 0.0), (0.25, 0.5)]):
        metrics = {"val_nll": 9.0 - i * 0.1, "loss": 8.0} if i != 3 else {"loss": 8.0}
        table.add({"masking.t2i_text_drop": t, "masking.ti2i_image_drop": v}, metrics,
                  "done" if i != 3 else "ERROR (RuntimeError)", f"run{i}")
    return table


def test_results_table_as_csv_and_markdown():
    table = table_2x2()
    best = table.best("val_nll", "min")
    assert best["run_id"] == "run2"  # the errored cell has no val_nll and cannot win
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [r["run_id"] for r in rows] == ["run0", "run1", "run2", "run3"]
    assert float(rows[2]["val_nll"]) == pytest.approx(8.8) and rows[3]["val_nll"] == ""
    markdown = table.to_markdown(best)
    assert markdown.splitlines()[0] == "| t2i_text_drop | ti2i_image_drop | val_nll | loss | status | MLflow run |"
    assert "| 0.25 | 0.0 | 8.8 | 8 | done * | run2 |" in markdown
    assert table.best("val_nll", "max")["run_id"] == "run0"


def test_seeds_are_averaged_into_mean_and_spread(tmp_path):
    table = ResultsTable(params=["masking.t2i_text_drop", "train.seed"], metrics=["val_nll"])
    for drop, seed, nll in [(0.0, 0, 2.0), (0.0, 1, 2.2), (0.5, 0, 1.0), (0.5, 1, 1.6)]:
        table.add({"masking.t2i_text_drop": drop, "train.seed": seed}, {"val_nll": nll}, "done", f"r{drop}{seed}")
    means = table.aggregated()
    assert [(r["masking.t2i_text_drop"], r["train.seed"]) for r in means.rows] == [(0.0, "0,1"), (0.5, "0,1")]
    assert means.rows[0]["val_nll"] == pytest.approx(2.1)
    assert means.rows[1]["val_nll_std"] == pytest.approx(0.4243, abs=1e-4)
    best = means.best("val_nll", "min")
    assert best is means.rows[1] and best["run_id"] == "r0.50 r0.51"
    markdown = means.to_markdown(best)
    assert "val_nll (mean ± sd)" in markdown.splitlines()[0]
    assert "| 0.5 | 0,1 | 1.3 ± 0.42 (n=2) | done * |" in markdown
    assert table_2x2().aggregated().rows == table_2x2().rows  # no seed key: unchanged
    order = ResultsTable(params=["masking.t2i_text_drop", "data.shuffle_seed"], metrics=["val_nll"])
    for seed, nll in [(0, 2.0), (1, 3.0)]:
        order.add({"masking.t2i_text_drop": 0.1, "data.shuffle_seed": seed}, {"val_nll": nll}, "done", f"s{seed}")
    assert order.aggregated().rows[0]["val_nll"] == pytest.approx(2.5)  # any key ending in "seed" is a seed
    means.save_heatmap(tmp_path / "means.png", "val_nll", "min")


def test_heatmaps_for_two_and_three_grid_keys(tmp_path):
    path = table_2x2().save_heatmap(tmp_path / "heatmap.png", "val_nll", "min", note="a note")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    table = ResultsTable(params=["cfg_weight", "cfg_weight2", "temperature"], metrics=["clip_t"])
    for cell in grid_cells({"cfg_weight": [1.0, 5.0], "cfg_weight2": [1.0, 3.0, 5.0], "temperature": [0.8, 1.0]}):
        table.add(cell, {"clip_t": cell["cfg_weight"] * 0.01 + cell["temperature"]}, "done", "r")
    wide = table.save_heatmap(tmp_path / "three.png", "clip_t", "max")
    with Image.open(wide) as image, Image.open(path) as narrow:
        assert image.size[0] > narrow.size[0]  # one panel per temperature
