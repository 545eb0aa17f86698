"""Ingest, piece by piece: reading sources, checking records, preparing images, encoding and
writing (no cluster; the whole job on Ray and S3 is tests/test_ingest_job.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from janus_lab.config import load_config
from janus_lab.data import (
    MANIFEST_NAME,
    IngestError,
    SHARD_SCHEMA,
    DatasetManifest,
    OutputExistsError,
    SourceError,
    read_records,
    run_ingest,
    split_of,
    write_sample_dataset,
)
from janus_lab.data.config import IngestConfig
from janus_lab.data.images import ImageRejected, decode_png_pixels, encode_png, letterbox, prepare_image
from janus_lab.data.ingest import (
    ENCODED_SCHEMA,
    PREPARED_SCHEMA,
    VQEncoder,
    prepare_output,
    prepare_records,
    vq_fingerprint,
    write_shard,
)
from janus_lab.data.sample import sample_records, write_tar
from janus_lab.data.schema import REJECT_CATEGORIES, assign_splits
from janus_lab.data.sources import (
    ImageReader,
    PathEscapeError,
    archive_members,
    build_image_index,
    check_records,
    list_source_files,
    resolve_image_path,
)
from bad_sources import BAD_SOURCE_GOOD, bomb_png, half, janus_square, png_bytes, scene, write_bad_source

REPO = Path(__file__).resolve().parents[1]
SAMPLE_YAML = REPO / "jobs" / "configs" / "ingest_sample.yaml"


def index_of(root: Path):
    files = list_source_files(str(root))
    members = {name: archive_members(str(root), name) for name in files if name.endswith((".tar", ".tar.gz"))}
    return files, build_image_index(str(root), files, members)


# --------------------------------------------------------------------------- sources (no Ray)


@pytest.mark.parametrize("path", ["../x.png", "image/../../x.png", "/etc/passwd", "s3://other/x.png",
                                  "C:/x.png", "..", ".", "image/\x00.png"])
def test_paths_that_leave_the_source_root(path):
    with pytest.raises(PathEscapeError):
        resolve_image_path("", path)


def test_paths_inside_the_source_root():
    assert resolve_image_path("", "image/./a.png") == "image/a.png"
    assert resolve_image_path("sub", "../image/a.png") == "image/a.png"  # up from a subfolder, still inside
    with pytest.raises(PathEscapeError):
        resolve_image_path("sub", "../../a.png")


def test_tar_members_read_in_place_and_compressed_ones_streamed(tmp_path):
    files = [(f"image/{i}.png", png_bytes(scene(c))) for i, c in enumerate(["red", "green", "blue"])]
    write_tar(tmp_path / "part_1.tar", files)
    (tmp_path / "sub" / "images").mkdir(parents=True)
    write_tar(tmp_path / "sub" / "images" / "part_1.tar.gz", [(n.removeprefix("image/"), d) for n, d in files],
              compress=True)
    _, index = index_of(tmp_path)
    with ImageReader(str(tmp_path)) as reader:
        for name, data in files:
            location = index.locate(name)
            assert location.member == name and not location.streamed
            assert reader.read(location) == data
        # A compressed member is named relative to its archive's folder or any folder above it.
        for key in ("sub/images/1.png", "sub/1.png", "1.png"):
            assert index.locate(key) is not None and index.locate(key).streamed
        archive = index.locate("sub/images/1.png").file
        assert dict(reader.stream_members(archive, {"1.png", "2.png"})) == {"1.png": files[1][1], "2.png": files[2][1]}


def test_plain_files_win_over_archive_members(tmp_path):
    write_tar(tmp_path / "part_1.tar", [("image/a.png", b"from the tar")])
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "a.png").write_bytes(b"loose")
    _, index = index_of(tmp_path)
    assert index.locate("image/a.png").member is None


def test_a_link_out_of_the_source_is_an_escape(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(scene()))
    root = tmp_path / "src"
    (root / "image").mkdir(parents=True)
    (root / "image" / "link.png").symlink_to(secret)
    (root / "text_to_image.json").write_text(json.dumps([{"input_prompt": "x", "output_image": "image/link.png"}]))
    files, index = index_of(root)
    _, rejects = check_records(read_records("sharegpt4o", str(root), files), index)
    assert [r.category for r in rejects] == ["path escapes source root"]


def test_records_rejected_before_any_image_is_read(tmp_path):
    expected = write_bad_source(tmp_path / "src")
    files, index = index_of(tmp_path / "src")
    records = read_records("sharegpt4o", str(tmp_path / "src"), files)
    accepted, rejects = check_records(records, index)
    before_reading = {"missing image", "path escapes source root", "empty prompt", "duplicate id",
                      "malformed record", "no input image"}
    assert {(r.source_file, r.record_index): r.category for r in rejects} == {
        key: c for key, c in expected.items() if c in before_reading}
    assert all(r.category in REJECT_CATEGORIES and ": " in r.reason for r in rejects)
    duplicate = next(r for r in rejects if r.category == "duplicate id")
    assert "first seen in text_to_image.json at index 0" in duplicate.reason
    assert len(accepted) + len(rejects) == len(records) == 22


def test_sharegpt_records_get_stable_derived_ids(tmp_path):
    write_sample_dataset(tmp_path, num_t2i=2, num_ti2i=1)
    records = read_records("sharegpt4o", str(tmp_path))
    assert [r.id for r in records] == ["text_to_image.json:image/t2i_0000.png", "text_to_image.json:image/t2i_0001.png",
                                       "text_and_image_to_image.json:image/ti2i_0000.png"]
    assert [r.task for r in records] == ["t2i", "t2i", "ti2i"]


def test_a_source_without_record_files_fails_naming_them(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "a.png").write_bytes(png_bytes(scene()))
    with pytest.raises(SourceError, match="has neither text_to_image.json nor text_and_image_to_image.json"):
        read_records("sharegpt4o", str(tmp_path))
    with pytest.raises(SourceError, match=r"no \*.jsonl record files"):
        read_records("echo4o", str(tmp_path))
    with pytest.raises(SourceError, match="does not exist or is empty"):
        read_records("sharegpt4o", str(tmp_path / "nothing"))


@pytest.mark.parametrize("text, message", [("[{\"input_prompt\": ", "text_to_image.json is not valid JSON"),
                                           ("{\"a\": 1}", "text_to_image.json must hold a JSON array")])
def test_unreadable_record_file_fails_naming_it(tmp_path, text, message):
    (tmp_path / "text_and_image_to_image.json").write_text("[]")
    (tmp_path / "text_to_image.json").write_text(text)
    with pytest.raises(SourceError, match=message):
        read_records("sharegpt4o", str(tmp_path))


def test_a_bad_jsonl_line_is_one_reject(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"prompt": "ok", "output_image": "a.png"}\n{oops\n\n'
                                      '{"prompt": "x", "output_image": "b.png", "task": "edit"}\n')
    records = read_records("jsonl", str(tmp_path))
    assert [(r.record_index, r.defect is None) for r in records] == [(0, True), (1, False), (3, False)]
    assert "line is not valid JSON" in records[1].defect and "task must be" in records[2].defect


# --------------------------------------------------------------------------- images (no Ray)


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected) as err:
        prepare_image(bomb_png(), max_pixels=4096 * 4096, side=64)
    assert err.value.category == "image too large"
    assert "100000x100000 = 10000000000 pixels, over the limit of 16777216" in err.value.detail
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's own guard is back in place
    assert prepare_image(png_bytes(Image.new("RGB", (100, 50))), max_pixels=5000, side=64).size == (64, 64)
    with pytest.raises(ImageRejected, match="image too large"):
        prepare_image(png_bytes(Image.new("RGB", (100, 51))), max_pixels=5000, side=64)


@pytest.mark.parametrize("data", [half(png_bytes(scene())), png_bytes(scene())[:-30], b"GIF89a-not-really",
                                  b"", png_bytes(scene(), "JPEG")[:400]])
def test_truncated_or_garbage_bytes_are_unreadable(data):
    with pytest.raises(ImageRejected) as err:
        prepare_image(data, max_pixels=10**8, side=64)
    assert err.value.category == "unreadable image"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK", "F"])
def test_every_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "F" else "PNG")
    image = prepare_image(png_bytes(scene("white", mode=mode), fmt), max_pixels=10**8, side=64)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.getpixel((2, 32))[0] > 200  # white stays light (mid-height: the top and bottom rows are bars)


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = prepare_image(png_bytes(image), max_pixels=10**8, side=32)
    assert rgb.getpixel((5, 5)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)
    palette = scene("green", mode="P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert prepare_image(png_bytes(palette), 10**8, 96).getpixel((0, 48)) == (255, 255, 255)  # 96 x 80: bars at top


def test_sixteen_bit_grey_keeps_its_range():
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    data = png_bytes(grey)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # what PIL makes of a 16-bit PNG
    assert prepare_image(data, 10**8, 8).getpixel((0, 0)) == (128, 128, 128)


def test_prepared_pixels_are_what_image_to_tensor_feeds_the_model():
    from janus_lab.model.vq import image_to_tensor, pixels_to_tensor

    original = sample_records(num_t2i=1, num_ti2i=0)[0].output_image()  # 256 x 256 or not square
    prepared = prepare_image(png_bytes(original), 10**8, 64)
    stored = decode_png_pixels(encode_png(prepared, compress_level=1))
    assert np.array_equal(pixels_to_tensor(stored).numpy(), image_to_tensor(original, 64).numpy())


@pytest.mark.parametrize("size, side", [((100, 60), 64), ((60, 100), 64), ((1536, 1024), 64), ((1024, 1536), 384),
                                        ((320, 256), 64), ((7, 300), 64), ((80, 80), 64)])
def test_letterbox_is_janus_resize_and_pad(size, side):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))  # every pixel distinct
    boxed = letterbox(image, side)
    assert boxed.mode == "RGB" and boxed.size == (side, side)
    assert np.array_equal(np.asarray(boxed), janus_square(image, side))


def test_letterbox_keeps_the_aspect_ratio_between_grey_bars():
    wide = Image.new("RGB", (100, 60), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 50, 60))  # left half blue, right half red
    pixels = np.asarray(letterbox(wide, 64)).astype(int)
    band = int(60 / 100 * 64)  # 38 rows of picture, 13 grey rows above, 13 below
    top = (64 - band) // 2
    assert (pixels[:top] == 127).all() and (pixels[top + band:] == 127).all()
    assert (pixels[top:top + band, :30] == (30, 30, 200)).all() and (pixels[top:top + band, 34:] == (200, 30, 30)).all()
    tall = np.asarray(letterbox(wide.transpose(Image.Transpose.ROTATE_90), 64)).astype(int)
    assert (tall[:, :top] == 127).all() and (tall[:, top + band:] == 127).all()  # bars left and right
    assert letterbox(Image.new("RGB", (64, 64), "red"), 64).getpixel((0, 0)) == (255, 0, 0)  # square: no bars


def test_letterbox_grey_is_janus_image_mean():
    from janus_lab.data.images import LETTERBOX_GREY
    from janus_lab.model.tokenizer import IMAGE_MEAN

    assert LETTERBOX_GREY == tuple(int(m * 255) for m in IMAGE_MEAN) == (127, 127, 127)


# --------------------------------------------------------------------------- manifest and split


def test_manifest_round_trip(tmp_path):
    manifest = DatasetManifest(source={"format": "sharegpt4o", "path": "s3://b/raw"},
                               model={"preset": "debug", "weights": None, "image_size": 64, "num_image_tokens": 16,
                                      "fingerprint": "ab" * 32, "init_seed": 42},
                               counts={"t2i": {"train": 3, "val": 1}, "ti2i": {"train": 2, "val": 0}}, rows=6,
                               shards=["part-00000.parquet"], rejects=2, val_fraction=0.1, seed=7)
    manifest.write(str(tmp_path / "ds"))
    assert DatasetManifest.read(str(tmp_path / "ds")) == manifest
    assert [p.name for p in (tmp_path / "ds").iterdir()] == [MANIFEST_NAME]
    assert manifest.created.endswith("+00:00")
    old = json.loads(manifest.to_json()) | {"schema_version": 0}
    with pytest.raises(ValueError, match="schema version 0"):
        DatasetManifest.from_json(json.dumps(old))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        DatasetManifest.read(str(tmp_path))
    by_count = DatasetManifest(**{**manifest.__dict__, "val_fraction": None, "val_count": 500,
                                  "limits": {"max_text_tokens": {"limit": 256, "rejected": 3}}})
    assert DatasetManifest.from_json(by_count.to_json()) == by_count
    before = {k: v for k, v in json.loads(manifest.to_json()).items() if k not in ("val_count", "limits")}
    read = DatasetManifest.from_json(json.dumps(before))  # written before those fields existed
    assert read.val_count is None and read.limits == {}


def test_split_is_a_stable_function_of_seed_and_id():
    ids = [f"text_to_image.json:image/{i}.png" for i in range(4000)]
    splits = [split_of(i, 0, 0.1) for i in ids]
    assert splits == [split_of(i, 0, 0.1) for i in ids]
    assert 0.08 < splits.count("val") / len(ids) < 0.12
    assert splits != [split_of(i, 1, 0.1) for i in ids]
    assert {split_of(i, 0, 0.0) for i in ids} == {"train"} and {split_of(i, 0, 1.0) for i in ids} == {"val"}


def test_split_by_count_holds_exactly_that_many_whatever_the_order():
    ids = [f"text_to_image.json:image/{i}.png" for i in range(4000)]
    splits = assign_splits(ids, 0, None, val_count=50)
    assert splits.count("val") == 50
    val = {i for i, split in zip(ids, splits) if split == "val"}
    shuffled = list(reversed(ids))
    assert {i for i, split in zip(shuffled, assign_splits(shuffled, 0, None, 50)) if split == "val"} == val
    more = ids + [f"echo:{i}" for i in range(500)]  # added records push some ids out of val, none in
    grown = {i for i, split in zip(more, assign_splits(more, 0, None, 50)) if split == "val"}
    assert len(grown) == 50 and {i for i in grown if i in set(ids)} <= val
    assert assign_splits(ids[:10], 0, None, 50) == ["val"] * 10
    assert set(assign_splits(ids, 0, None, 0)) == {"train"}
    assert assign_splits(ids, 3, 0.1) == [split_of(i, 3, 0.1) for i in ids]  # by fraction: as before


# --------------------------------------------------------------------------- output folder


def test_output_preparation(tmp_path):
    out = tmp_path / "ds"
    prepare_output(str(out), overwrite=False)  # missing: fine
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"x")
    (out / "_tmp-abc").mkdir()
    (out / "_tmp-abc" / "1.parquet").write_bytes(b"x")
    prepare_output(str(out), overwrite=False)  # unfinished (no manifest): cleaned
    assert list(out.iterdir()) == []
    (out / "part-00000.parquet").write_bytes(b"x")
    (out / MANIFEST_NAME).write_text("{}")
    with pytest.raises(OutputExistsError, match="output.overwrite=true"):
        prepare_output(str(out), overwrite=False)
    assert (out / MANIFEST_NAME).exists()
    prepare_output(str(out), overwrite=True)
    assert list(out.iterdir()) == []
    (out / "part-00000.parquet").write_bytes(b"x")
    (out / "notes.txt").write_text("not ours")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"files an ingest did not write \(notes.txt\)"):
            prepare_output(str(out), overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "part-00000.parquet"]


# --------------------------------------------------------------------------- pipeline stages (no Ray)


def _work_table(root: Path, fmt: str = "sharegpt4o") -> tuple[pa.Table, list]:
    from janus_lab.data.ingest import _work_record

    files, index = index_of(root)
    accepted, rejects = check_records(read_records(fmt, str(root), files), index)
    work = [_work_record(r, fmt, "train") for r in accepted]
    return pa.table({"records": [json.dumps(work)]}), rejects


def test_read_stage_rejects_bad_images_and_prepares_good_ones(tmp_path):
    expected = write_bad_source(tmp_path / "src")
    work, _ = _work_table(tmp_path / "src")
    rows = pa.concat_tables(prepare_records(work, str(tmp_path / "src"), max_pixels=100_000, side=32)).to_pylist()
    reasons = {(r["source_file"], r["record_index"]): r["reason"] for r in rows}
    assert {key: reason.split(":")[0] for key, reason in reasons.items() if reason} == {
        key: c for key, c in expected.items() if c in ("unreadable image", "image too large")}
    good = [r for r in rows if not r["reason"]]
    assert {(r["source_file"], r["record_index"]) for r in good} == BAD_SOURCE_GOOD | {("text_to_image.json", 10)}
    for row in good:
        for png in (row["output_png"], *row["input_pngs"]):
            assert decode_png_pixels(png).shape == (32, 32, 3)
    assert "truncated.png" in reasons[("text_to_image.json", 4)]


def test_read_stage_streams_compressed_parts_once(tmp_path, monkeypatch):
    write_sample_dataset(tmp_path, "echo4o", num_t2i=5, num_ti2i=4)
    work, _ = _work_table(tmp_path, "echo4o")
    passes = []
    original = ImageReader.stream_members

    def counting(self, archive, wanted):
        passes.append(archive)
        return original(self, archive, wanted)

    monkeypatch.setattr(ImageReader, "stream_members", counting)
    rows = pa.concat_tables(prepare_records(work, str(tmp_path), max_pixels=10**8, side=16)).to_pylist()
    assert len(rows) == 9 and not any(r["reason"] for r in rows)
    assert sorted(passes) == sorted(set(passes)) and len(passes) == 2  # one pass per archive
    two_inputs = [r for r in rows if len(r["input_pngs"]) == 2]
    assert len(two_inputs) == 1


def test_read_stage_shares_streamed_images_and_survives_a_corrupt_archive(tmp_path):
    archive = tmp_path / "images" / "part_1.tar.gz"
    archive.parent.mkdir()
    write_tar(archive, [(f"{c}.png", png_bytes(scene(c, size=(256, 256)))) for c in ("red", "green", "blue")],
              compress=True)
    lines = [{"id": "1", "prompt": "p", "output_image": "images/red.png"},
             {"id": "2", "prompt": "p", "output_image": "images/green.png",
              "input_images": ["images/red.png", "images/red.png"]},
             {"id": "3", "prompt": "p", "output_image": "images/blue.png", "input_images": ["images/green.png"]}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    work, _ = _work_table(tmp_path, "jsonl")
    rows = pa.concat_tables(prepare_records(work, str(tmp_path), 10**8, 16)).to_pylist()
    assert sorted(r["id"] for r in rows) == ["1", "2", "3"] and not any(r["reason"] for r in rows)
    two = next(r for r in rows if r["id"] == "2")
    assert two["input_pngs"][0] == two["input_pngs"][1] == next(r for r in rows if r["id"] == "1")["output_png"]

    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])  # the archive breaks after it was listed
    rows = pa.concat_tables(prepare_records(work, str(tmp_path), 10**8, 16)).to_pylist()
    reasons = [r["reason"] for r in rows if r["reason"]]
    assert len(rows) == 3 and reasons
    assert all(r.startswith("unreadable image: images/") and "archive part_1.tar.gz" in r for r in reasons), reasons


@pytest.fixture(scope="module")
def encoder():
    return VQEncoder({"preset": "debug", "image_size": 64}, init_seed=42, max_text_tokens=64)


def test_encoder_codes_equal_encode_vq_codes(encoder):
    from janus_lab.model import debug, encode_vq_codes, image_to_tensor

    records = [r for r in sample_records(num_t2i=2, num_ti2i=4) if r.task == "t2i" or len(r.inputs) == 2][:3]
    rows = []
    for r in records:
        pngs = [encode_png(prepare_image(png_bytes(image), 10**8, 64), compress_level=1)
                for image in [r.output_image(), *r.input_images()]]
        rows.append({"id": r.name, "task": r.task, "prompt": r.prompt, "source": "s", "split": "train",
                     "source_file": "f", "record_index": 0, "reason": None, "output_png": pngs[0],
                     "input_pngs": pngs[1:]})
    rows.append(rows[0] | {"id": "long", "prompt": "red " * 200})
    out = encoder(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)).to_pylist()
    bundle = debug(seed=42)  # the same init seed gives the same VQ tokenizer
    model = bundle.model
    for r, row in zip(records, out):
        expected = encode_vq_codes(model, image_to_tensor(r.output_image(), 64).unsqueeze(0))[0].tolist()
        assert row["output_codes"] == expected and len(expected) == 16
        for image, codes in zip(r.input_images(), row["input_codes"]):
            assert codes == encode_vq_codes(model, image_to_tensor(image, 64).unsqueeze(0))[0].tolist()
        assert len(row["input_pixels"]) == len(r.inputs)
    assert out[-1]["reason"].startswith("prompt too long: prompt has") and out[-1]["output_codes"] is None
    assert out[0]["fingerprint"] == vq_fingerprint(model, bundle.processor.tokenizer)


def test_encoder_from_weights_reads_only_the_vq_tokenizer_and_encodes_alike(tmp_path):
    """A checkpoint folder gives the same codes and fingerprint as the model it was saved from,
    and the actor holds the VQ tokenizer alone (bf16 on disk, as the released weights are)."""
    import torch
    from transformers import JanusVQVAE

    from janus_lab.model import debug, encode_vq_codes, image_to_tensor
    from janus_lab.model.weights import save_pretrained

    bundle = debug(seed=42)
    bundle.model.model.vqmodel.to(torch.bfloat16)
    save_pretrained(bundle, tmp_path / "ckpt")
    from_weights = VQEncoder({"preset": "debug", "weights": str(tmp_path / "ckpt"), "image_size": 64},
                             init_seed=0, max_text_tokens=64)  # the seed only matters for random init
    assert isinstance(from_weights.vq, JanusVQVAE) and not hasattr(from_weights, "model")
    assert from_weights.vq.quantize.embedding.weight.dtype == torch.float32
    assert from_weights.fingerprint == vq_fingerprint(bundle.model, bundle.processor.tokenizer)
    image = image_to_tensor(sample_records(num_t2i=1, num_ti2i=0)[0].output_image(), 64).unsqueeze(0)
    assert torch.equal(encode_vq_codes(from_weights.vq, image), encode_vq_codes(bundle.model.float(), image))
    with pytest.raises(ValueError, match="model.image_size is 384 but the model reads 64 px images"):
        VQEncoder({"preset": "debug", "weights": str(tmp_path / "ckpt"), "image_size": 384}, 0, 64)


def test_mini_encoder_needs_only_the_shipped_vq_tokenizer(monkeypatch):
    """Ingest for the miniature runs before its base model exists: only the VQ tokenizer is read."""
    from janus_lab.miniature import assets

    def no_base_model(*_):
        raise FileNotFoundError("base.safetensors is missing")

    monkeypatch.setattr(assets, "load_base", no_base_model)
    mini = VQEncoder({"preset": "mini", "image_size": 64}, init_seed=0, max_text_tokens=64)
    assert mini.fingerprint == VQEncoder({"preset": "mini-init", "image_size": 64}, 0, 64).fingerprint


def test_fingerprint_follows_the_vq_weights_not_the_dtype():
    from janus_lab.model import debug

    a, b = debug(seed=1), debug(seed=2)
    tokenizer = a.processor.tokenizer
    assert vq_fingerprint(a.model, tokenizer) != vq_fingerprint(b.model, tokenizer)
    import torch

    a_bf16 = debug(seed=1)
    a_bf16.model.model.vqmodel.to(torch.bfloat16)
    a.model.model.vqmodel.to(torch.bfloat16).to(torch.float32)
    assert vq_fingerprint(a.model, tokenizer) == vq_fingerprint(a_bf16.model, tokenizer)


def test_fingerprint_follows_what_makes_the_codes_and_not_the_decoder():
    import torch

    from janus_lab.model import debug

    a = debug(seed=1)
    tokenizer = a.processor.tokenizer
    before = vq_fingerprint(a.model, tokenizer)
    vq = a.model.model.vqmodel
    with torch.no_grad():
        vq.decoder.conv_out.weight.add_(1.0)  # a retrained decoder: same codes, other pixels
        vq.post_quant_conv.bias.add_(1.0)
    assert vq_fingerprint(a.model, tokenizer) == before
    for part in (vq.encoder.conv_in.weight, vq.quant_conv.weight, vq.quantize.embedding.weight):
        with torch.no_grad():
            part.add_(1e-3)
        assert vq_fingerprint(a.model, tokenizer) != before, part.shape
        with torch.no_grad():
            part.sub_(1e-3)


def test_writer_writes_good_rows_and_reports_rejects(tmp_path):
    good = {"id": "a", "task": "ti2i", "prompt": "p", "output_codes": [1] * 16, "input_codes": [[2] * 16],
            "input_pixels": [b"png"], "source": "jsonl:r.jsonl", "split": "val", "source_file": "r.jsonl",
            "record_index": 3, "reason": None, "fingerprint": "f"}
    bad = {k: None for k in good} | {"id": "b", "source_file": "r.jsonl", "record_index": 1,
                                     "reason": "missing image: x.png", "fingerprint": "f"}
    summary = write_shard(pa.Table.from_pylist([good, bad], schema=ENCODED_SCHEMA), str(tmp_path)).to_pylist()[0]
    table = pq.read_table(tmp_path / summary["shard"])
    assert table.schema.equals(SHARD_SCHEMA) and table.num_rows == 1
    assert pq.ParquetFile(tmp_path / summary["shard"]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert json.loads(summary["counts"])["ti2i"] == {"train": 0, "val": 1}
    assert json.loads(summary["rejects"]) == [{"source_file": "r.jsonl", "record_index": 1, "id": "b",
                                               "reason": "missing image: x.png"}]


def test_writer_keeps_each_split_in_row_groups_of_their_own(tmp_path):
    """Row groups are what training workers fetch: small, and never mixing train and val rows."""
    row = {"task": "t2i", "prompt": "p", "output_codes": [1] * 16, "input_codes": [], "input_pixels": [],
           "source": "jsonl:r.jsonl", "source_file": "r.jsonl", "reason": None, "fingerprint": "f"}
    rows = [row | {"id": str(i), "record_index": i, "split": "val" if i % 3 == 0 else "train"} for i in range(10)]
    summary = write_shard(pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA), str(tmp_path),
                          rows_per_row_group=4).to_pylist()[0]
    shard = pq.ParquetFile(tmp_path / summary["shard"])
    groups = [shard.read_row_group(i)["split"].to_pylist() for i in range(shard.metadata.num_row_groups)]
    assert groups == [["train"] * 4, ["train"] * 2, ["val"] * 4]
    split = SHARD_SCHEMA.names.index("split")  # a leaf column of its own, after the nested ones
    stats = [shard.metadata.row_group(i).column(split) for i in range(3)]
    assert [(c.path_in_schema, c.statistics.min, c.statistics.max) for c in stats] == \
        [("split", "train", "train")] * 2 + [("split", "val", "val")]  # what readers count row groups by


def test_records_are_written_in_a_mixed_order_not_source_order(tmp_path):
    from janus_lab.data.ingest import _work_items

    write_sample_dataset(tmp_path, num_t2i=48, num_ti2i=32)  # two source files, one per task
    files, index = index_of(tmp_path)
    accepted, _ = check_records(read_records("sharegpt4o", str(tmp_path), files), index)
    items = _work_items(accepted, records_per_task=16)
    assert sorted(len(item) for item in items) == [16] * 5
    for item in items:  # in source order the first three items would be T2I only, the last two TI2I only
        assert {r.record.source_file for r in item} == {"text_to_image.json", "text_and_image_to_image.json"}
    assert [r.record.id for item in items for r in item] == \
        [r.record.id for item in _work_items(accepted[::-1], records_per_task=16) for r in item]


def test_ingest_of_a_non_square_image_stores_it_letterboxed(tmp_path, encoder):
    """Read task -> encoder actor, as the job chains them: the edit input and the target are
    letterboxed (grey bars, not stretched), and the codes are those of the letterboxed images."""
    from janus_lab.model import debug, encode_vq_codes
    from janus_lab.model.vq import pixels_to_tensor

    rng = np.random.default_rng(5)
    wide = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (100, 60, 3), dtype=np.uint8))
    (tmp_path / "wide.png").write_bytes(png_bytes(wide))
    (tmp_path / "tall.png").write_bytes(png_bytes(tall))
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "1", "prompt": "turn it upright", "output_image": "tall.png",
                                                  "input_images": ["wide.png"]}) + "\n")
    work, _ = _work_table(tmp_path, "jsonl")
    prepared = pa.concat_tables(prepare_records(work, str(tmp_path), 10**8, 64))
    (row,) = encoder(prepared).to_pylist()
    assert row["reason"] is None
    stored = decode_png_pixels(row["input_pixels"][0])
    assert np.array_equal(stored, janus_square(wide, 64))
    assert (stored[:13] == 127).all() and (stored[-13:] == 127).all()  # 64 x 38 picture between bars
    model = debug(seed=42).model  # the encoder fixture's VQ tokenizer
    expected = encode_vq_codes(model, pixels_to_tensor(np.stack([janus_square(tall, 64), janus_square(wide, 64)])))
    assert [row["output_codes"], *row["input_codes"]] == expected.tolist()


def test_manifest_and_log_count_what_each_limit_dropped(tmp_path):
    from janus_lab.data.ingest import _finish
    from janus_lab.data.schema import Reject

    good = {"id": "a", "task": "t2i", "prompt": "p", "output_codes": [1] * 16, "input_codes": [], "input_pixels": [],
            "source": "jsonl:r.jsonl", "split": "val", "source_file": "r.jsonl", "record_index": 0, "reason": None,
            "fingerprint": "f"}
    dropped = [{k: None for k in good} | {"id": str(i), "source_file": "r.jsonl", "record_index": i,
                                          "reason": reason, "fingerprint": "f"}
               for i, reason in enumerate(["prompt too long: prompt has 300 tokens, more than the limit of 256",
                                           "prompt too long: prompt has 290 tokens, more than the limit of 256",
                                           "image too large: x.png (header claims ...)"], start=1)]
    staging = tmp_path / "out" / "_tmp-x"
    staging.mkdir(parents=True)
    summary = write_shard(pa.Table.from_pylist([good, *dropped], schema=ENCODED_SCHEMA), str(staging)).to_pylist()[0]
    early = [Reject("r.jsonl", 9, "9", "missing image: y.png")]  # rejected by the driver's checks
    cfg = load_config(IngestConfig, SAMPLE_YAML, ["split.val_fraction=null", "split.val_count=5"])
    result = _finish(cfg, str(tmp_path / "out"), str(staging), [summary], early, time.monotonic())
    manifest = DatasetManifest.read(str(tmp_path / "out"))
    assert manifest.limits == {"max_text_tokens": {"limit": 256, "rejected": 2},
                               "max_image_pixels": {"limit": 4096 * 4096, "rejected": 1}}
    assert (manifest.val_fraction, manifest.val_count, manifest.rejects) == (None, 5, 4)
    log = result.summary()
    assert "dropped by limits: 2 over max_text_tokens=256, 1 over max_image_pixels=16777216" in log
    assert "held out for validation: 1 rows (val_count=5)" in log


def test_sample_config_loads():
    cfg = load_config(IngestConfig, SAMPLE_YAML)
    assert (cfg.source.format, cfg.source.path, cfg.output.uri) == ("sharegpt4o", "data/sample", "data/sample-shards")
    assert (cfg.model.preset, cfg.model.image_size, cfg.init_seed, cfg.output.overwrite) == ("debug", 64, 42, False)
    from janus_lab.config import ConfigError

    with pytest.raises(ConfigError, match="split.val_fraction must be in"):
        load_config(IngestConfig, SAMPLE_YAML, ["split.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="did you mean 'source.format'"):
        load_config(IngestConfig, SAMPLE_YAML, ["source.fromat=echo4o"])


def test_a_submitted_job_refuses_relative_local_paths(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` sets for the driver
    with pytest.raises(IngestError, match="source.path='data/sample' is relative"):
        run_ingest(load_config(IngestConfig, SAMPLE_YAML))


def test_job_help_lists_every_key():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "ingest.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("usage:") and "ray job submit" in out
    for key in ("source.format", "output.overwrite", "limits.max_image_pixels", "split.val_fraction",
                "ray.num_encoder_actors", "model.preset", "init_seed"):
        assert key in out
