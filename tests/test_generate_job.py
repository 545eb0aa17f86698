"""jobs/generate.py end to end on a saved debug checkpoint: files written, codes reproducible."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from janus_lab.generation import GenerationEngine, GenerationRequest
from janus_lab.generation.loading import ModelSourceError, resolve_model_uri
from janus_lab.model import debug
from janus_lab.model.weights import save_pretrained

REPO = Path(__file__).resolve().parents[1]


def load_job():
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "export"
    save_pretrained(debug(), folder)
    return folder


@pytest.fixture()
def request_file(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    lines = [
        {"prompt": "a red circle", "parallel_size": 2},
        {"prompt": "make it blue", "input_images": ["cat.png"], "seed": 42, "temperature": 0},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_job_writes_images_sheet_and_reproducible_codes(checkpoint, request_file, tmp_path):
    out = tmp_path / "out"
    rc = load_job().main([f"model={checkpoint}", f"requests={request_file}", f"output_dir={out}",
                          "parallel_size=1", "seed=7", "top_k=100"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["t2i", "ti2i"]
    assert [r["seed"] for r in records] == [7, 42]  # seed + index unless the line sets one
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000-00.png", "0000-01.png", "0001-00.png"]
    assert Image.open(out / "images" / "0001-00.png").size == (64, 64)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (2 * 68 + 4, 2 * 68 + 4)  # rows: 2 outputs | input + output

    # The same requests through the engine directly give the same codes.
    engine = GenerationEngine.from_bundle(debug())
    cat = (request_file.parent / "cat.png").read_bytes()
    expected = engine.generate([
        GenerationRequest("a red circle", parallel_size=2, seed=7, top_k=100),
        GenerationRequest("make it blue", input_images=[cat], seed=42, temperature=0, top_k=100),
    ], decode_images=False)
    assert [r["codes"] for r in records] == [e.codes.tolist() for e in expected]


def test_job_refuses_a_bad_line_before_writing_anything(checkpoint, request_file, tmp_path, capsys):
    request_file.write_text(request_file.read_text() + json.dumps({"prompt": "x", "cfg_weight": -1}) + "\n")
    out = tmp_path / "out"
    assert load_job().main([f"model={checkpoint}", f"requests={request_file}", f"output_dir={out}"]) == 2
    assert "requests[2].cfg_weight: must be >= 0" in capsys.readouterr().err
    assert not out.exists()
    request_file.write_text(json.dumps({"prompt": "x", "input_images": ["missing.png"]}) + "\n")
    assert load_job().main([f"model={checkpoint}", f"requests={request_file}", f"output_dir={out}"]) == 2
    assert "prompts.jsonl:1.input_images[0]: file" in capsys.readouterr().err


def test_command_line_prompt_with_input_image(checkpoint, request_file, tmp_path, monkeypatch):
    monkeypatch.chdir(request_file.parent)
    out = tmp_path / "single"
    rc = load_job().main([f"model={checkpoint}", "prompt=make it blue", "input_images=[cat.png]",
                          f"output_dir={out}", "parallel_size=2", "temperature=0"])
    assert rc == 0
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["task"] == "ti2i" and len(record["images"]) == 2


def test_registry_uri_needs_mlflow(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.artifacts", None)
    with pytest.raises(ModelSourceError, match="needs mlflow"):
        resolve_model_uri("models:/janus-4o@champion")
    assert resolve_model_uri("s3://bucket/export") == "s3://bucket/export"


def test_registry_uri_downloads_the_aliased_version(checkpoint, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = MlflowClient(uri)
    experiment = client.create_experiment("gen-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(checkpoint), "export")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("janus-test")
    version = client.create_model_version("janus-test", f"runs:/{run.info.run_id}/export", run.info.run_id)
    client.set_registered_model_alias("janus-test", "champion", version.version)

    local = Path(resolve_model_uri("models:/janus-test@champion"))
    assert (local / "config.json").exists()
    assert any(local.glob("*.safetensors"))
    del mlflow
