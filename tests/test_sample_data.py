"""The procedural sample dataset: layouts, determinism, and prompts that describe the pictures."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from janus_lab.data.sample import COLORS, POSITIONS, sample_records, write_sample_dataset
from janus_lab.data.sources import archive_members, build_image_index, check_records, list_source_files, read_records

REPO = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sharegpt4o_layout(tmp_path):
    write_sample_dataset(tmp_path, "sharegpt4o")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["text_and_image_to_image.json", "text_and_image_to_image_part_1.tar",
                     "text_and_image_to_image_part_2.tar", "text_to_image.json", "text_to_image_part_1.tar",
                     "text_to_image_part_2.tar"]  # images only inside the tars, as released
    t2i = json.loads((tmp_path / "text_to_image.json").read_text())
    ti2i = json.loads((tmp_path / "text_and_image_to_image.json").read_text())
    assert (len(t2i), len(ti2i)) == (48, 32)
    assert set(t2i[0]) == {"input_prompt", "output_image", "output_image_resolution"}
    assert set(ti2i[0]) == {"input_prompt", "input_image", "input_image_resolution", "output_image",
                            "output_image_resolution"}
    assert sum(len(r["input_image"]) == 2 for r in ti2i) == 8 and all(r["input_image"] for r in ti2i)
    members = {}
    for tar_path in tmp_path.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                assert info.name.startswith("image/") and info.name.endswith(".png")
                members[info.name] = tar.extractfile(info).read()
    referenced = [r["output_image"] for r in t2i + ti2i] + [p for r in ti2i for p in r["input_image"]]
    assert sorted(referenced) == sorted(members)  # every image referenced once, none missing
    record = ti2i[0]
    image = Image.open(io.BytesIO(members[record["output_image"]]))
    assert image.mode == "RGB" and list(image.size) == record["output_image_resolution"]


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    write_sample_dataset(tmp_path / "a", seed=3)
    write_sample_dataset(tmp_path / "b", seed=3)
    write_sample_dataset(tmp_path / "c", seed=4)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "a")["text_to_image.json"] != _tree(tmp_path / "c")["text_to_image.json"]


def test_refuses_a_folder_with_files_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_sample_dataset(tmp_path)
    assert (tmp_path / "notes.txt").exists()
    write_sample_dataset(tmp_path, overwrite=True)
    assert not (tmp_path / "notes.txt").exists() and (tmp_path / "text_to_image.json").exists()


def test_prompts_describe_the_pictures():
    for record in sample_records(num_t2i=12, num_ti2i=0):
        image = record.output_image()
        width, height = image.size
        for shape in record.output.shapes:
            assert f"{shape.color} {shape.kind}" in record.prompt
            fx, fy = POSITIONS[shape.position]
            if shape.kind in ("circle", "square", "cross", "star"):  # solid at their centre
                assert image.getpixel((int(fx * width), int(fy * height))) == COLORS[shape.color]
        assert record.prompt.endswith(f"{record.output.background} background")
        assert image.getpixel((0, 0)) == COLORS[record.output.background]  # shapes never reach the corners


def test_edits_change_the_picture_and_some_have_two_inputs():
    edits = [r for r in sample_records() if r.task == "ti2i"]
    assert len(edits) == 32 and sum(len(r.inputs) == 2 for r in edits) == 8
    for record in edits:
        assert record.output != record.inputs[0]
        assert record.output_image().tobytes() != record.input_images()[0].tobytes()
    two = next(r for r in edits if len(r.inputs) == 2)
    assert "from the second image" in two.prompt


@pytest.mark.parametrize("layout", ["sharegpt4o", "echo4o", "jsonl"])
def test_every_layout_reads_back_whole(tmp_path, layout):
    written = write_sample_dataset(tmp_path, layout, num_t2i=6, num_ti2i=4)
    files = list_source_files(str(tmp_path))
    records = read_records(layout, str(tmp_path), files)
    members = {name: archive_members(str(tmp_path), name) for name in files if name.endswith((".tar", ".tar.gz"))}
    accepted, rejects = check_records(records, build_image_index(str(tmp_path), files, members))
    assert not rejects and len(accepted) == 10
    assert sorted(r.record.prompt for r in accepted) == sorted(r.prompt for r in written)
    assert sorted(len(r.inputs) for r in accepted) == sorted(len(r.inputs) for r in written)
    if layout == "echo4o":
        assert all(r.output.streamed for r in accepted)  # read straight out of .tar.gz parts


def test_command_line(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "sample_data.py"), "--out", str(tmp_path / "s"),
                          "--layout", "jsonl"], capture_output=True, text=True, check=True)
    assert "wrote 80 records (48 t2i, 32 ti2i) in the jsonl layout" in out.stdout
    assert (tmp_path / "s" / "records.jsonl").exists()
