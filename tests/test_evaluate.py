"""Evaluation (`jobs/evaluate.py`) on the debug model, no cluster: held-out NLL per task, CLIP
scores from a saved random test CLIP, and benchmark exports in the layouts the official
scoring scripts read (GenEval, DPG-Bench, ImgEdit basic), from tiny prompt files written here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from janus_lab.config import ConfigError, load_config
from janus_lab.evaluation.benchmarks import BenchmarkFileError, read_dpg, read_geneval, read_imgedit
from janus_lab.evaluation.evaluate import EvaluateConfig
from entry_points import run_main
from synthetic_shards import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
EDIT_INPUT = REPO / "sweeps" / "prompts" / "images" / "ti2i_0000_input_0.png"


def evaluate_job(*args: str) -> tuple[int, str, str]:
    return run_main("jobs/evaluate.py", *args)


def write_benchmark_files(root: Path) -> dict[str, Path]:
    """Two prompts per benchmark, in each benchmark's own file format."""
    geneval = root / "evaluation_metadata.jsonl"
    geneval.write_text("\n".join(json.dumps(m) for m in [
        {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
        {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a red square"},
    ]) + "\n")
    dpg = root / "dpg_prompts"
    dpg.mkdir()
    (dpg / "partiprompts12.txt").write_text("A blue star above a green circle.\n")
    (dpg / "whoops3.txt").write_text("A yellow square on a purple background.\n")
    images = root / "singleturn" / "animal"
    images.mkdir(parents=True)
    (images / "000342021.jpg").write_bytes(EDIT_INPUT.read_bytes())
    imgedit = root / "basic_edit.json"
    imgedit.write_text(json.dumps({
        "1082": {"id": "animal/000342021.jpg", "prompt": "make the square blue", "edit_type": "alter"},
        "97": {"id": "animal/000342021.jpg", "prompt": "add a red circle", "edit_type": "add"},
    }))
    return {"geneval": geneval, "dpg": dpg, "imgedit": imgedit, "imgedit_images": root / "singleturn"}


def test_evaluate_job_scores_and_exports_every_benchmark_layout(tmp_path):
    from janus_lab.evaluation.clip import save_random_clip

    files = write_benchmark_files(tmp_path)
    dataset = write_synthetic_dataset(tmp_path / "shards")
    clip = save_random_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    rc, stdout, stderr = evaluate_job(
        "model=debug", f"data_uri={dataset}", f"prompts={REPO / 'sweeps' / 'prompts' / 'debug.jsonl'}",
        f"clip_model={clip}", "parallel_size=2", "geneval_images=2", f"output_dir={out}",
        *(f"{k}={v}" for k, v in files.items()))
    assert rc == 0, stderr
    assert "RANDOM TEST CLIP" in stdout

    scores = json.loads((out / "scores.json").read_text())
    metrics = scores["scores"]
    for task in ("t2i", "ti2i"):
        # A random model is close to uniform over the 16384 codes.
        assert metrics[f"val_{task}_nll"] == pytest.approx(math.log(16384), abs=0.5)
        assert 0 <= metrics[f"val_{task}_accuracy"] <= 1
    assert {"val_nll", "clip_t", "clip_t_edit", "clip_i"} <= set(metrics)
    assert "RANDOM TEST CLIP" in scores["clip"] and scores["settings"]["cfg_weight"] == 5.0

    # GenEval: <index:05d>/metadata.jsonl + samples/<i:04d>.png
    geneval = out / "geneval"
    assert sorted(p.name for p in geneval.iterdir()) == ["00000", "00001"]
    first = json.loads((geneval / "00001" / "metadata.jsonl").read_text())
    assert first["prompt"] == "a red square" and first["tag"] == "colors"
    assert sorted(p.name for p in (geneval / "00000" / "samples").iterdir()) == ["0000.png", "0001.png"]
    # DPG-Bench: <id>.png, a 2 x 2 grid of the model's side (64 px for debug)
    dpg = out / "dpg_bench"
    assert sorted(p.name for p in dpg.iterdir()) == ["partiprompts12.png", "whoops3.png"]
    with Image.open(dpg / "whoops3.png") as grid:
        assert grid.size == (128, 128)
    # ImgEdit basic: <key>.png
    assert sorted(p.name for p in (out / "imgedit").iterdir()) == ["1082.png", "97.png"]


def test_a_prompt_over_the_limit_is_refused_alone_and_the_rest_evaluated(tmp_path):
    import pyarrow.parquet as pq

    long_prompt = "a red circle next to a blue square " * 40  # about 400 tokens of the debug tokenizer
    dataset = write_synthetic_dataset(tmp_path / "shards")
    shard = sorted(dataset.glob("shard-*.parquet"))[-1]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    long_row = next(row for row in rows if row["split"] == "val")
    long_row["prompt"] = long_prompt
    pq.write_table(table.from_pylist(rows, schema=table.schema), shard)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in [
        {"prompt": "a red square"}, {"prompt": long_prompt},
        {"prompt": "remove the square", "input_images": [str(EDIT_INPUT)]}]))
    geneval = tmp_path / "evaluation_metadata.jsonl"
    geneval.write_text(json.dumps({"tag": "colors", "prompt": long_prompt}) + "\n"
                       + json.dumps({"tag": "colors", "prompt": "a red square"}) + "\n")
    out = tmp_path / "eval"
    rc, stdout, stderr = evaluate_job("model=debug", f"data_uri={dataset}", f"prompts={prompts}", "clip_model=debug",
                                      f"geneval={geneval}", "parallel_size=1", "geneval_images=1",
                                      "max_text_tokens=256", f"output_dir={out}")
    assert rc == 0, stderr
    scores = json.loads((out / "scores.json").read_text())
    refused = scores["refused"]
    assert set(refused) == {"heldout", "prompts", "geneval"}
    too_long = r"prompt has \d+ tokens, more than the limit of 256"
    assert list(refused["heldout"]) == [long_row["id"]] and re.fullmatch(too_long, refused["heldout"][long_row["id"]])
    assert list(refused["prompts"]) == ["1"] and re.fullmatch(r"requests\[1\]\.prompt: " + too_long,
                                                              refused["prompts"]["1"])
    assert list(refused["geneval"]) == ["00000"] and re.search(too_long, refused["geneval"]["00000"])
    assert {"val_nll", "clip_t", "clip_t_edit", "clip_i"} <= set(scores["scores"])  # the others were scored
    assert sorted(p.name for p in (out / "geneval").iterdir()) == ["00001"]
    assert "prompts: refused 1" in stdout and "heldout: refused 1" in stdout


def test_evaluation_generates_with_a_sweeps_best_settings(tmp_path):
    from janus_lab.evaluation.evaluate import sampling_settings

    path = tmp_path / "best.yaml"
    path.write_text("# from a CFG sweep\ncfg_weight: 3.0\ncfg_weight2: 1.0\ntemperature: 0.8\n")
    assert sampling_settings(str(path)) == {"cfg_weight": 3.0, "cfg_weight2": 1.0, "temperature": 0.8,
                                            "top_k": None, "top_p": None}
    path.write_text("cfg_wieght: 3.0\n")
    with pytest.raises(ConfigError, match="did you mean 'cfg_weight'"):
        sampling_settings(str(path))


@pytest.mark.parametrize("overrides, message", [
    (["model=debug"], "nothing to evaluate"),
    (["model=debug", "prompts=p.jsonl"], "set clip_model"),
    (["model=debug", "imgedit=basic_edit.json"], "imgedit and imgedit_images go together"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EvaluateConfig, None, overrides)


def test_bad_benchmark_files_are_refused_before_the_model_loads(tmp_path):
    files = write_benchmark_files(tmp_path)
    with pytest.raises(BenchmarkFileError, match="does not exist"):
        read_geneval(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"tag": "colors"}\n')
    with pytest.raises(BenchmarkFileError, match="has no `prompt`"):
        read_geneval(tmp_path / "bad.jsonl")
    with pytest.raises(BenchmarkFileError, match="not a folder"):
        read_dpg(tmp_path / "nope")
    with pytest.raises(BenchmarkFileError, match="input image .* does not exist"):
        read_imgedit(files["imgedit"], tmp_path / "elsewhere")
    rc, _, err = evaluate_job("model=debug", f"geneval={tmp_path / 'bad.jsonl'}", f"output_dir={tmp_path / 'o'}")
    assert rc == 2 and "has no `prompt`" in err


def test_a_dataset_without_val_rows_is_a_clear_error_not_a_traceback(tmp_path):
    dataset = write_synthetic_dataset(tmp_path / "shards", num_val=0)
    rc, _, err = evaluate_job("model=debug", f"data_uri={dataset}", f"output_dir={tmp_path / 'o'}")
    assert rc == 2 and "has no val rows" in err and "Traceback" not in err
