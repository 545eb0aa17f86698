"""Images for standard benchmarks, written in the folder layouts their official scoring reads.

The prompt files are the benchmarks' own (inputs, not shipped); users score the folders with
the official tools on their own machines:

- GenEval (`prompts/evaluation_metadata.jsonl`, one JSON object with a `prompt` per line):
  `<out>/<index:05d>/metadata.jsonl` (that line) and `<out>/<index:05d>/samples/<i:04d>.png`,
  `images_per_prompt` samples each; score with GenEval's `evaluation/evaluate_images.py <out>`.
- DPG-Bench (the `prompts/` folder of `<id>.txt` files): `<out>/<id>.png`, a 2 x 2 grid of four
  images of the model's side; score with `compute_dpg_bench.py --image-root-path <out>
  --resolution <side> --pic-num 4`.
- ImgEdit basic (`basic_edit.json`: key -> {id: image path under the image root, prompt,
  edit_type}): `<out>/<key>.png`, one edited image per key; score with
  `basic_bench.py --result_img_folder <out> --edit_json basic_edit.json --origin_img_root <root>`.

A prompt the model cannot take (longer than the token limit, an unreadable input image) is
refused alone: it gets no output and its reason is returned; the other prompts are generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from janus_lab.generation import GenerationEngine, GenerationRequest

DPG_GRID = 2
"""DPG-Bench expects 4 images per prompt as one 2 x 2 grid."""


class BenchmarkFileError(ValueError):
    """A benchmark prompt file that is missing or not in the benchmark's format."""


@dataclass
class BenchmarkExport:
    """What an export wrote."""

    folder: Path
    """The benchmark's output folder."""
    refused: dict[str, str]
    """Item key -> why it has no output."""


@dataclass
class BenchmarkItem:
    """One prompt of a benchmark and where its output goes."""

    key: str
    """The benchmark's id: GenEval index, DPG prompt id, ImgEdit key."""
    prompt: str
    record: Any = None
    """GenEval: the metadata object; ImgEdit: the input image path."""


def read_geneval(path: str | Path) -> list[BenchmarkItem]:
    """GenEval's `evaluation_metadata.jsonl`, items keyed by their line index."""
    items = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkFileError(f"{path}:{number} is not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise BenchmarkFileError(f"{path}:{number} has no `prompt` string: not GenEval metadata")
        items.append(BenchmarkItem(key=f"{len(items):05d}", prompt=record["prompt"], record=record))
    return _non_empty(items, path)


def read_dpg(folder: str | Path) -> list[BenchmarkItem]:
    """DPG-Bench's prompt folder: one `<id>.txt` per prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchmarkFileError(f"DPG-Bench prompts {folder} is not a folder of <id>.txt files")
    items = [BenchmarkItem(key=path.stem, prompt=path.read_text().strip()) for path in sorted(folder.glob("*.txt"))]
    return _non_empty(items, folder)


def read_imgedit(path: str | Path, image_root: str | Path) -> list[BenchmarkItem]:
    """ImgEdit's `basic_edit.json`; each item's input image is checked to exist under `image_root`."""
    try:
        edits = json.loads(_read(path))
    except json.JSONDecodeError as err:
        raise BenchmarkFileError(f"{path} is not JSON ({err})") from None
    if not isinstance(edits, dict):
        raise BenchmarkFileError(f"{path}: expected an object of key -> {{id, prompt, edit_type}}")
    items = []
    for key, edit in edits.items():
        if not isinstance(edit, dict) or not {"id", "prompt"} <= set(edit):
            raise BenchmarkFileError(f"{path}: entry {key!r} lacks id or prompt")
        image = Path(image_root) / edit["id"]
        if not image.is_file():
            raise BenchmarkFileError(f"{path}: entry {key!r}: input image {image} does not exist")
        items.append(BenchmarkItem(key=str(key), prompt=edit["prompt"], record=image))
    return _non_empty(items, path)


def export_geneval(engine: GenerationEngine, items: Sequence[BenchmarkItem], out: str | Path,
                   settings: Mapping[str, Any], images_per_prompt: int = 4, seed: int = 0,
                   batch_images: int = 16) -> BenchmarkExport:
    """Generates `images_per_prompt` samples per GenEval prompt into GenEval's layout."""
    out = Path(out)

    def write(item: BenchmarkItem, images: list[Image.Image]) -> None:
        folder = out / item.key
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(item.record) + "\n")
        for index, image in enumerate(images):
            image.save(folder / "samples" / f"{index:04d}.png")

    return BenchmarkExport(out, _generate(engine, items, settings, images_per_prompt, seed, batch_images, write))


def export_dpg(engine: GenerationEngine, items: Sequence[BenchmarkItem], out: str | Path, settings: Mapping[str, Any],
               seed: int = 0, batch_images: int = 16) -> BenchmarkExport:
    """Generates 4 images per DPG-Bench prompt, saved as one 2 x 2 grid `<id>.png`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def write(item: BenchmarkItem, images: list[Image.Image]) -> None:
        side = images[0].width
        grid = Image.new("RGB", (DPG_GRID * side, DPG_GRID * side))
        for index, image in enumerate(images):
            grid.paste(image, ((index % DPG_GRID) * side, (index // DPG_GRID) * side))
        grid.save(out / f"{item.key}.png")

    return BenchmarkExport(out, _generate(engine, items, settings, DPG_GRID * DPG_GRID, seed, batch_images, write))


def export_imgedit(engine: GenerationEngine, items: Sequence[BenchmarkItem], out: str | Path,
                   settings: Mapping[str, Any], seed: int = 0, batch_images: int = 16) -> BenchmarkExport:
    """Edits each ImgEdit input image by its instruction, saved as `<key>.png`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return BenchmarkExport(out, _generate(engine, items, settings, 1, seed, batch_images,
                                          lambda item, images: images[0].save(out / f"{item.key}.png")))


def _generate(engine: GenerationEngine, items: Sequence[BenchmarkItem], settings: Mapping[str, Any], per_prompt: int,
              seed: int, batch_images: int,
              write: Callable[[BenchmarkItem, list[Image.Image]], None]) -> dict[str, str]:
    """Generates and writes every item; returns the refused ones, key -> reason."""
    requests = [GenerationRequest(item.prompt, parallel_size=per_prompt, seed=seed + index, **settings,
                                  input_images=[Path(item.record).read_bytes()] if isinstance(item.record, Path) else [])
                for index, item in enumerate(items)]
    refused: dict[str, str] = {}

    def refuse(index: int, error: Exception) -> None:
        refused[items[index].key] = str(error)

    for index, result in engine.generate_in_batches(requests, max_images=batch_images, on_refused=refuse):
        write(items[index], result.images)
    return refused


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise BenchmarkFileError(f"benchmark prompt file {path} does not exist") from None


def _non_empty(items: list[BenchmarkItem], source) -> list[BenchmarkItem]:
    if not items:
        raise BenchmarkFileError(f"{source} holds no prompts")
    return items
