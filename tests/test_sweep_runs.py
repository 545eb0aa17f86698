"""Sweeps on a local Ray cluster and the local stack's MLflow server, the way users run them.

One 2 x 2 masking ablation of the debug model does double duty: its first attempt is a
`sweeps/masking_ablation.py` process killed (SIGKILL, whole process group) as soon as one trial
has finished, and `--resume` then completes it; every cell must end with exactly one child run,
and the finished trial must not have trained again. A 2 x 2 CFG sweep scores a saved debug
checkpoint with a saved random test CLIP. Trials are tiny (4 steps, 1 train worker), so each
costs mostly Ray Train start-up.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from janus_lab.sweeps.runner import SWEEP_CELL_TAG, SWEEP_PATH_TAG, SweepError
from janus_lab.tracking import PARENT_RUN_TAG
from synthetic_shards import write_synthetic_dataset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = f"sweep-tests-{os.getpid()}"


@pytest.fixture(scope="module")
def ray_cluster(local_stack):
    """A throwaway cluster; 6 logical CPUs hold 2 trials of (trial + 1 train worker + Ray Data headroom)."""
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def sweep_runs(client, sweep_path: str) -> tuple:
    """(parent run, its child runs) of a sweep."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = [r for r in runs if r.data.tags.get(SWEEP_PATH_TAG) == sweep_path]
    assert len(parents) <= 1, parents
    parent = parents[0] if parents else None
    children = [r for r in runs if parent and r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
    return parent, children


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "sweeps/masking_ablation.py", "--config", "sweeps/configs/debug.yaml", *args]


def test_masking_ablation_killed_after_a_trial_resumes_and_runs_every_cell_once(ray_cluster, tmp_path):
    from ray.tune import ExperimentAnalysis

    from janus_lab.config import load_config
    from janus_lab.sweeps.config import MaskingAblationConfig
    from janus_lab.sweeps.masking import run_masking_ablation

    dataset = write_synthetic_dataset(tmp_path / "shards")
    args = [f"overrides.data.uri={dataset}", f"overrides.train.storage_path={tmp_path / 'runs'}",
            "overrides.train.max_steps=4", "overrides.train.checkpoint_every=2",
            f"run.storage_path={tmp_path / 'tune'}", "run.max_concurrent_trials=2",
            f"tracking.experiment={EXPERIMENT}"]
    env = os.environ | {"RAY_ADDRESS": ray_cluster, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    sweep_path = str(tmp_path / "tune" / "masking-debug")
    client = mlflow_client()

    first = subprocess.Popen(sweep_command(*args), cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished_before = None
    try:
        deadline = time.monotonic() + 300
        while finished_before is None and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.5)
            _, children = sweep_runs(client, sweep_path)
            done = [c for c in children if c.info.status == "FINISHED"]
            finished_before = done[0] if done else None
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and anything it started in its group
        first.wait(timeout=30)
    assert finished_before is not None, "no trial finished before the deadline (or the sweep exited)"
    parent, children = sweep_runs(client, sweep_path)
    assert parent.info.status == "RUNNING"
    assert len(children) < 4 or any(c.info.status != "FINISHED" for c in children), "the kill came too late"
    loss_steps_before = [m.step for m in client.get_metric_history(finished_before.info.run_id, "loss")]

    again = subprocess.run(sweep_command(*args, "--resume"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=420)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "| t2i_text_drop | ti2i_image_drop | val_nll |" in again.stdout  # the driver prints the table

    parent, children = sweep_runs(client, sweep_path)
    assert parent.info.status == "FINISHED"
    cells = sorted(c.data.tags[SWEEP_CELL_TAG] for c in children)
    assert cells == ["t2i_text_drop0.0-ti2i_image_drop0.0", "t2i_text_drop0.0-ti2i_image_drop0.5",
                     "t2i_text_drop0.25-ti2i_image_drop0.0", "t2i_text_drop0.25-ti2i_image_drop0.5"]  # one run each
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val_nll", "loss", "val_t2i_nll"} <= set(child.data.metrics), child.data.metrics
        assert child.data.params["train.max_steps"] == "4"
        # train.eval_at_start is off in the debug sweep: validated at the last step only.
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_nll")] == [4]
    kept = client.get_run(finished_before.info.run_id)
    assert kept.info.end_time == finished_before.info.end_time  # not trained again
    assert [m.step for m in client.get_metric_history(kept.info.run_id, "loss")] == loss_steps_before == [2, 4]

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.csv", "results/results.md", "results/heatmap_val_nll.png"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "results/results.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert len(rows) == 4 and all(r["status"] == "done" and float(r["val_nll"]) > 0 for r in rows)
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children}
    assert "best_val_nll" in parent.data.metrics
    trials = ExperimentAnalysis(sweep_path).trials
    assert len(trials) == 4 and all(t.status == "TERMINATED" for t in trials)

    # The sweep exists now: starting it again without --resume is refused before any trial.
    with pytest.raises(SweepError, match="add --resume to continue it"):
        run_masking_ablation(load_config(MaskingAblationConfig, REPO / "sweeps" / "configs" / "debug.yaml", args))


def test_cfg_sweep_scores_a_checkpoint_and_writes_the_best_setting(ray_cluster, tmp_path):
    from janus_lab.config import load_config
    from janus_lab.evaluation.clip import save_random_clip
    from janus_lab.model import debug
    from janus_lab.model.weights import save_pretrained
    from janus_lab.sweeps.cfg import run_cfg_sweep
    from janus_lab.sweeps.config import CfgSweepConfig

    save_pretrained(debug(), tmp_path / "checkpoint")
    save_random_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.jsonl"
    (tmp_path / "in.png").write_bytes((REPO / "sweeps" / "prompts" / "images" / "ti2i_0001_input_0.png").read_bytes())
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a red circle on a white background"},
        {"prompt": "make the star white", "input_images": ["in.png"]},
    ]) + "\n")
    cfg = load_config(CfgSweepConfig, REPO / "sweeps" / "configs" / "cfg_debug.yaml", [
        f"model={tmp_path / 'checkpoint'}", f"prompts={prompts}", f"clip_model={tmp_path / 'clip'}",
        f"run.storage_path={tmp_path / 'tune'}", f"best_settings={tmp_path / 'best.yaml'}",
        f"tracking.experiment={EXPERIMENT}", "run.max_concurrent_trials=4"])
    outcome = run_cfg_sweep(cfg)

    assert outcome.sweep.errors == 0 and "RANDOM TEST CLIP" in outcome.clip_label
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert set(best) == {"cfg_weight", "cfg_weight2", "temperature"} and best["temperature"] == 1.0
    assert "RANDOM TEST CLIP" in (tmp_path / "best.yaml").read_text()
    client = mlflow_client()
    parent, children = sweep_runs(client, str(tmp_path / "tune" / "cfg-debug"))
    assert parent.info.status == "FINISHED" and parent.data.params["random_test_clip"] == "True"
    assert len(children) == 4
    for child in children:
        assert {"clip_t", "clip_t_edit", "clip_i"} <= set(child.data.metrics)
        assert -1 <= child.data.metrics["clip_t"] <= 1 and "RANDOM TEST CLIP" in child.data.tags["clip"]
        assert [a.path for a in client.list_artifacts(child.info.run_id, "samples")] == ["samples/contact_sheet.png"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.csv", "results/results.md", "results/heatmap_clip_t.png", "results/heatmap_clip_i.png",
            "results/best_settings.yaml"} <= artifacts
    markdown = Path(client.download_artifacts(parent.info.run_id, "results/results.md", str(tmp_path))).read_text()
    assert markdown.startswith("scores from a RANDOM TEST CLIP") and markdown.count("| done") == 4
