"""Model registry promotion (`jobs/promote.py`) on the local stack: the champion gate, forced
promotions, refusals that change nothing, and `models:/<name>@champion` loading the export.

A fine-tune costs minutes here, so the runs are made the way `run_finetune` leaves them, through
the same `RunLogger`: tags git_commit / dataset_uri / dataset_fingerprint, val_* metrics, and an
`export_uri` tag naming a real Hugging Face export of the debug model in S3 (or a local folder).
Each test promotes into its own registered model; the MLflow server is shared by the session.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import uuid
from pathlib import Path

import pytest
import torch

from janus_lab.config import ConfigError, load_config
from janus_lab.registry import PromoteConfig, is_better
from registry_runs import make_run as log_finished_run

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = f"promote-tests-{os.getpid()}"


def load_job():
    spec = importlib.util.spec_from_file_location("promote_job", REPO / "jobs" / "promote.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def promote_job(*args: str) -> tuple[int, str, str]:
    """Runs `jobs/promote.py ARGS` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = load_job().main(list(args))
        except SystemExit as exit_:  # parse_cli exits 2 on a bad config, like argparse
            rc = exit_.code
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- unit: no stack


def test_config_needs_a_reason_with_force_and_force_with_a_reason():
    assert PromoteConfig(run_id="r").direction == "minimize"
    with pytest.raises(ConfigError, match="reason must say why when force=true"):
        load_config(PromoteConfig, None, ["run_id=r", "force=true"])
    with pytest.raises(ConfigError, match="reason must say why"):
        load_config(PromoteConfig, None, ["run_id=r", "force=true", "reason=' '"])
    with pytest.raises(ConfigError, match="reason is only used with force=true"):
        load_config(PromoteConfig, None, ["run_id=r", "reason=because"])
    with pytest.raises(ConfigError, match="direction"):
        load_config(PromoteConfig, None, ["run_id=r", "direction=lower"])
    with pytest.raises(ConfigError, match="missing required key 'run_id'"):
        load_config(PromoteConfig, None, [])


def test_better_is_strict_in_both_directions():
    assert is_better(9.31, 9.52, "minimize") and not is_better(9.52, 9.52, "minimize")
    assert is_better(0.6, 0.5, "maximize") and not is_better(0.5, 0.5, "maximize")
    assert not is_better(9.6, 9.52, "minimize") and not is_better(0.4, 0.5, "maximize")


# --------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def exports(local_stack):
    """Two debug models with different weights, exported to S3 the way fine-tuning exports."""
    from janus_lab.model import debug
    from janus_lab.model.weights import save_pretrained

    root = f"s3://{local_stack.bucket}/tests/promote-{os.getpid()}"
    bundles = {"a": debug(seed=1), "b": debug(seed=2)}
    for key, bundle in bundles.items():
        save_pretrained(bundle, f"{root}/export-{key}")
    return {key: (f"{root}/export-{key}", bundle) for key, bundle in bundles.items()}


@pytest.fixture(scope="module")
def client(local_stack):
    from mlflow import MlflowClient

    return MlflowClient(local_stack.mlflow_tracking_uri)


def make_run(local_stack, export_uri: str | None, val_nll: float, val_accuracy: float = 0.5) -> str:
    """A finished run as `run_finetune` leaves it; returns its id."""
    return log_finished_run(local_stack.mlflow_tracking_uri, EXPERIMENT, export_uri, val_nll, val_accuracy)


def unique_name() -> str:
    return f"janus-4o-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def registry_state(client, name: str) -> tuple[dict, list[str]]:
    """(aliases, versions) of a registered model; ({}, []) when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = dict(client.get_registered_model(name).aliases)
    except MlflowException:
        return {}, []
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    return aliases, [str(v) for v in versions]


@pytest.fixture(scope="module")
def gated(local_stack, exports, client):
    """A first promotion, a worse one, a better one, an equal one: each job's output and the aliases after it."""
    name = unique_name()
    steps = {}
    for step, export, val_nll in [("first", "a", 9.52), ("worse", "a", 9.60), ("better", "b", 9.31),
                                  ("equal", "a", 9.31)]:
        run_id = make_run(local_stack, exports[export][0], val_nll)
        rc, out, err = promote_job(f"run_id={run_id}", f"name={name}")
        assert rc == 0, err
        steps[step] = {"run_id": run_id, "out": out, "aliases": registry_state(client, name)[0]}
    return name, steps


@pytest.mark.integration
def test_first_promotion_becomes_champion_with_provenance_tags(gated, client, exports):
    name, steps = gated
    first = steps["first"]
    assert first["aliases"] == {"champion": "1", "challenger": "1"}
    assert f"{name} v1 (val_nll 9.52): no champion yet: champion -> v1" in first["out"]
    version = client.get_model_version(name, "1")
    assert version.run_id == first["run_id"]
    assert version.source.endswith(f"{first['run_id']}/artifacts/model")
    tags = version.tags
    assert tags["run_id"] == first["run_id"] and tags["git_commit"] == "0123abc"
    assert tags["dataset_uri"] == "s3://janus-lab/datasets/sample" and tags["dataset_fingerprint"] == "fp-sample-1"
    assert tags["export_uri"] == exports["a"][0]
    assert float(tags["metric.val_nll"]) == 9.52 and float(tags["metric.val_t2i_nll"]) == pytest.approx(9.42)
    assert float(tags["metric.val_accuracy"]) == 0.5 and "metric.loss" not in tags  # val_* only
    assert tags["promotion_metric"] == "val_nll" and tags["promotion_direction"] == "minimize"
    assert "forced" not in tags
    # The export is in the run's artifacts, so the version does not depend on the training folder.
    files = {Path(f.path).name for f in client.list_artifacts(first["run_id"], "model")}
    assert {"config.json", "model.safetensors"} <= files


@pytest.mark.integration
def test_worse_or_equal_becomes_challenger_only(gated):
    name, steps = gated
    assert steps["worse"]["aliases"] == {"champion": "1", "challenger": "2"}
    assert (f"{name} v2 (val_nll 9.6) does not beat champion v1 (val_nll 9.52) (minimize): "
            "champion stays v1; v2 is challenger") in steps["worse"]["out"]
    assert steps["equal"]["aliases"] == {"champion": "3", "challenger": "4"}  # strictly better only
    assert "v4 (val_nll 9.31) does not beat champion v3 (val_nll 9.31)" in steps["equal"]["out"]


@pytest.mark.integration
def test_better_moves_champion(gated):
    name, steps = gated
    assert steps["better"]["aliases"] == {"champion": "3", "challenger": "3"}
    assert f"{name} v3 (val_nll 9.31) beats champion v1 (val_nll 9.52) (minimize): champion -> v3" \
        in steps["better"]["out"]


@pytest.mark.integration
def test_champion_uri_loads_the_promoted_export(gated, exports, tmp_path):
    from janus_lab.generation.loading import load_generation_model, resolve_model_uri

    name, _ = gated
    folder = resolve_model_uri(f"models:/{name}@champion", download_dir=tmp_path)
    assert (Path(folder) / "config.json").exists()
    loaded = load_generation_model(f"models:/{name}@champion").model.state_dict()
    promoted, other = exports["b"][1].model.state_dict(), exports["a"][1].model.state_dict()
    assert loaded.keys() == promoted.keys()
    assert all(torch.equal(loaded[k], promoted[k]) for k in promoted)
    assert not all(torch.equal(loaded[k], other[k]) for k in other)  # v3's weights, not v1's


@pytest.mark.integration
def test_maximize_direction_gates_on_a_higher_metric(local_stack, exports, client):
    name = unique_name()
    low, high = (make_run(local_stack, exports["a"][0], val_nll=9.0, val_accuracy=acc) for acc in (0.4, 0.6))
    for run_id in (low, high):
        assert promote_job(f"run_id={run_id}", f"name={name}", "metric=val_accuracy", "direction=maximize")[0] == 0
    assert registry_state(client, name)[0] == {"champion": "2", "challenger": "2"}


@pytest.mark.integration
def test_forced_promotion_needs_a_reason_records_it_and_rolls_back(local_stack, exports, client, tmp_path):
    import shutil

    from janus_lab.generation.loading import load_generation_model
    from janus_lab.model import debug
    from janus_lab.model.weights import save_pretrained

    name = unique_name()
    good_bundle, good_export = debug(seed=3), tmp_path / "export"
    save_pretrained(good_bundle, good_export)  # a local export works as well as an s3:// one
    good, worse = make_run(local_stack, str(good_export), 9.3), make_run(local_stack, exports["a"][0], 9.9)
    assert promote_job(f"run_id={good}", f"name={name}")[0] == 0

    rc, _, err = promote_job(f"run_id={worse}", f"name={name}", "force=true")
    assert rc == 2 and "reason must say why when force=true" in err
    assert registry_state(client, name) == ({"champion": "1", "challenger": "1"}, ["1"])

    reason = "v1 regresses on edits (manual review)"
    rc, out, err = promote_job(f"run_id={worse}", f"name={name}", "force=true", f"reason={reason}")
    assert rc == 0, err
    assert f"{name} v2 (val_nll 9.9) forced over champion v1 (val_nll 9.3): champion -> v2 (reason: {reason})" in out
    assert registry_state(client, name) == ({"champion": "2", "challenger": "2"}, ["1", "2"])
    tags = client.get_model_version(name, "2").tags
    assert tags["forced"] == "true" and tags["force_reason"] == reason

    # Rolling back promotes the earlier run again: its version is reused, not duplicated, and it
    # still loads after the training folder's export is gone (the version is the run's copy).
    shutil.rmtree(good_export)
    rc, out, _ = promote_job(f"run_id={good}", f"name={name}", "force=true", "reason=rollback")
    assert rc == 0 and f"already registered as {name} v1" in out
    assert registry_state(client, name) == ({"champion": "1", "challenger": "1"}, ["1", "2"])
    loaded = load_generation_model(f"models:/{name}@champion").model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in good_bundle.model.state_dict().items())


@pytest.mark.integration
def test_bad_inputs_are_refused_before_any_change(local_stack, exports, client, tmp_path):
    name = unique_name()
    no_export = make_run(local_stack, None, 9.0)
    # A failed first promotion does not even create the registered model.
    rc, _, err = promote_job(f"run_id={no_export}", f"name={name}")
    assert rc == 2 and f"run {no_export} has no export_uri tag" in err
    assert registry_state(client, name) == ({}, [])

    good = make_run(local_stack, exports["a"][0], 9.5)
    assert promote_job(f"run_id={good}", f"name={name}")[0] == 0
    before = registry_state(client, name)

    not_a_checkpoint = tmp_path / "not-a-checkpoint"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "config.json").write_text("{}")
    missing_s3 = make_run(local_stack, f"s3://{local_stack.bucket}/tests/promote-{os.getpid()}/nothing-here", 9.0)
    missing_local = make_run(local_stack, str(tmp_path / "no-such-export"), 9.0)
    no_weights = make_run(local_stack, str(not_a_checkpoint), 9.0)
    cases = [
        ([f"run_id={'deadbeef' * 4}"], f"run_id={'deadbeef' * 4}: no such run"),
        ([f"run_id={good}", "metric=val_clip_t"],
         f"run {good} has no metric 'val_clip_t'; its validation metrics: val_accuracy, val_nll, val_t2i_nll"),
        ([f"run_id={no_export}"], "has no export_uri tag"),
        ([f"run_id={missing_s3}"], "nothing-here does not exist"),
        ([f"run_id={missing_local}"], "no-such-export does not exist"),
        ([f"run_id={no_weights}"], "is neither a Hugging Face checkpoint folder (config.json and *.safetensors) nor a LoRA adapter"),
    ]
    for args, message in cases:
        rc, out, err = promote_job(*args, f"name={name}")
        assert rc == 2 and message in err, (args, err)
        assert out == ""
        assert registry_state(client, name) == before, args
    for run_id in (missing_s3, missing_local, no_weights):
        assert client.list_artifacts(run_id, "model") == []

