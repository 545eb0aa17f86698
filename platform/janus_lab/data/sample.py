"""A small procedural dataset in the real layouts, for the demo and the tests.

Scenes are coloured shapes on a plain background. A text-to-image record pairs a scene with a
sentence that describes it; an editing record pairs one or two input scenes and an instruction
("make the circle green", "put the star from the second image into the first image on the
left") with the edited scene as output. Everything follows from one seed: the same seed gives
byte-identical files.

Layouts (`write_sample_dataset(layout=...)`):

- `sharegpt4o`: exactly ShareGPT-4o-Image: `text_to_image.json`, `text_and_image_to_image.json`,
  images as `image/*.png` inside `text_to_image_part_N.tar` / `text_and_image_to_image_part_N.tar`;
- `echo4o`: Echo-4o-Image: `<Subset>/<Subset>.jsonl` with images inside `<Subset>/images/*.tar.gz`;
- `jsonl`: `records.jsonl` with ids and tasks, images as plain files under `images/`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import shutil
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from janus_lab.data.images import encode_png

LAYOUTS = ("sharegpt4o", "echo4o", "jsonl")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 210, 40), "green": (50, 170, 70),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "pink": (240, 130, 180), "brown": (130, 80, 40),
    "black": (20, 20, 20), "white": (245, 245, 245), "gray": (128, 128, 128), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
SIZES = {"small": 0.13, "large": 0.24}  # radius as a fraction of the shorter side
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73), "center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5),
}
IMAGE_SIZES = ((256, 256), (320, 256), (256, 320))  # square and both aspect ratios, as in the real data


@dataclass(frozen=True)
class Shape:
    """One shape of a scene."""

    kind: str
    color: str
    size: str
    position: str

    def describe(self) -> str:
        return f"a {self.size} {self.color} {self.kind} {_where(self.position)}"


@dataclass(frozen=True)
class Scene:
    """Shapes on a plain background."""

    background: str
    shapes: tuple[Shape, ...]

    def describe(self) -> str:
        """A sentence naming every shape, its colour, size and place, and the background."""
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"{' and '.join(s.describe() for s in self.shapes)}, on {article} {self.background} background"

    def render(self, size: tuple[int, int]) -> Image.Image:
        """The scene as an RGB image of `size` (width, height)."""
        width, height = size
        image = Image.new("RGB", size, COLORS[self.background])
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            fx, fy = POSITIONS[shape.position]
            _draw_shape(draw, shape.kind, (fx * width, fy * height), SIZES[shape.size] * min(size), COLORS[shape.color])
        return image

    def shape(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)

    def replaced(self, old: Shape, new: Shape | None) -> "Scene":
        shapes = tuple(new if s == old else s for s in self.shapes if new is not None or s != old)
        return Scene(self.background, shapes)


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position} corner"


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, center: tuple[float, float], r: float,
                color: tuple[int, int, int]) -> None:
    x, y = center
    box = (x - r, y - r, x + r, y + r)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle((x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r), fill=color)
    elif kind == "triangle":
        draw.polygon([(x, y - r), (x + 0.95 * r, y + 0.8 * r), (x - 0.95 * r, y + 0.8 * r)], fill=color)
    elif kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=color)
    elif kind == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(0.35 * r)))
    elif kind == "cross":
        arm = 0.3 * r
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=color)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=color)
    else:
        raise ValueError(f"unknown shape {kind!r}")


class RecordFiles:
    """Where a record's images go inside the archives (`name` and `inputs` come from the record)."""

    name: str
    inputs: tuple

    @property
    def output_path(self) -> str:
        return f"image/{self.name}.png"

    @property
    def input_paths(self) -> list[str]:
        return [f"image/{self.name}_input_{k}.png" for k in range(len(self.inputs))]


@dataclass(frozen=True)
class SampleRecord(RecordFiles):
    """One record of the sample dataset, before it is written in a layout."""

    name: str
    """File stem of its output image, e.g. `t2i_0007`; unique."""
    task: str
    """"t2i" or "ti2i"."""
    prompt: str
    """Description (t2i) or edit instruction (ti2i)."""
    output: Scene
    inputs: tuple[Scene, ...]
    size: tuple[int, int]
    """(width, height) of every image of the record."""

    def output_image(self) -> Image.Image:
        return self.output.render(self.size)

    def input_images(self) -> list[Image.Image]:
        return [scene.render(self.size) for scene in self.inputs]


# --------------------------------------------------------------------------- scenes and edits


def _random_scene(rng: random.Random, num_shapes: int) -> Scene:
    background = rng.choice(list(COLORS))
    kinds = rng.sample(SHAPES, num_shapes)
    positions = rng.sample(list(POSITIONS), num_shapes)
    shapes = []
    for kind, position in zip(kinds, positions):
        color = rng.choice([c for c in COLORS if c != background])
        shapes.append(Shape(kind, color, rng.choice(list(SIZES)), position))
    return Scene(background, tuple(shapes))


def _one_input_edit(rng: random.Random, scene: Scene) -> tuple[str, Scene]:
    """An instruction and the scene it turns `scene` into."""
    target = rng.choice(scene.shapes)
    used_colors = {scene.background, *(s.color for s in scene.shapes)}
    edits = ["recolor", "background", "move", "resize", "add"] + (["remove"] if len(scene.shapes) > 1 else [])
    edit = rng.choice(edits)
    if edit == "recolor":
        color = rng.choice([c for c in COLORS if c not in used_colors])
        return f"make the {target.kind} {color}", scene.replaced(target, replace(target, color=color))
    if edit == "background":
        color = rng.choice([c for c in COLORS if c not in used_colors])
        return f"change the background to {color}", Scene(color, scene.shapes)
    if edit == "move":
        position = rng.choice([p for p in POSITIONS if p not in {s.position for s in scene.shapes}])
        return f"move the {target.kind} {_where(position)}", scene.replaced(target, replace(target, position=position))
    if edit == "resize":
        size = "small" if target.size == "large" else "large"
        verb = "smaller" if size == "small" else "larger"
        return f"make the {target.kind} {verb}", scene.replaced(target, replace(target, size=size))
    if edit == "remove":
        return f"remove the {target.kind}", scene.replaced(target, None)
    kind = rng.choice([k for k in SHAPES if k not in {s.kind for s in scene.shapes}])
    position = rng.choice([p for p in POSITIONS if p not in {s.position for s in scene.shapes}])
    added = Shape(kind, rng.choice([c for c in COLORS if c != scene.background]), rng.choice(list(SIZES)), position)
    return f"add {added.describe()}", Scene(scene.background, scene.shapes + (added,))


def _two_input_edit(rng: random.Random, first: Scene, second: Scene) -> tuple[str, Scene]:
    """Take a shape of the second scene into the first one."""
    taken = rng.choice(second.shapes)
    free = [p for p in POSITIONS if p not in {s.position for s in first.shapes}]
    position = rng.choice(free)
    kept = tuple(s for s in first.shapes if s.kind != taken.kind)  # one shape per kind in a scene
    placed = replace(taken, position=position)
    return (f"put the {taken.kind} from the second image into the first image {_where(position)}",
            Scene(first.background, kept + (placed,)))


def sample_records(seed: int = 0, num_t2i: int = 48, num_ti2i: int = 32,
                   two_input_every: int = 4) -> list[SampleRecord]:
    """The sample dataset's records; the same arguments always give the same records.

    Args:
        seed: seed of every random choice.
        num_t2i: text-to-image records.
        num_ti2i: editing records; every `two_input_every`-th of them has two input images.
    """
    rng = random.Random(seed)
    records = []
    for i in range(num_t2i):
        scene = _random_scene(rng, rng.choice((1, 1, 2)))
        records.append(SampleRecord(f"t2i_{i:04d}", "t2i", scene.describe(), scene, (), rng.choice(IMAGE_SIZES)))
    for i in range(num_ti2i):
        first = _random_scene(rng, rng.choice((1, 2)))
        size = rng.choice(IMAGE_SIZES)
        if two_input_every and i % two_input_every == two_input_every - 1:
            second = _random_scene(rng, 1)
            prompt, output = _two_input_edit(rng, first, second)
            inputs = (first, second)
        else:
            prompt, output = _one_input_edit(rng, first)
            inputs = (first,)
        records.append(SampleRecord(f"ti2i_{i:04d}", "ti2i", prompt, output, inputs, size))
    return records


# --------------------------------------------------------------------------- writing


def _image_files(record: SampleRecord) -> list[tuple[str, bytes]]:
    # Inputs first, so a reader streaming an archive meets them before the output.
    files = [(path, encode_png(image)) for path, image in zip(record.input_paths, record.input_images())]
    return files + [(record.output_path, encode_png(record.output_image()))]


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata, so the same records give byte-identical archives.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: Path, files: list[tuple[str, bytes]], compress: bool = False) -> None:
    """Writes `(member name, bytes)` pairs as a `.tar` (or a gzip-compressed one), reproducibly."""
    with open(path, "wb") as raw:
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in files:
                tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
        if compress:
            stream.close()


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _parts(files: list[tuple[str, bytes]], per_part: int) -> list[list[tuple[str, bytes]]]:
    return [files[i:i + per_part] for i in range(0, len(files), per_part)] or [[]]


def write_sharegpt4o(records: list[SampleRecord], out: Path, images_per_part: int = 40) -> None:
    """ShareGPT-4o-Image layout: two JSON arrays and `*_part_N.tar` files of `image/*.png`."""
    for stem, task in (("text_to_image", "t2i"), ("text_and_image_to_image", "ti2i")):
        chosen = [r for r in records if r.task == task]
        rows = []
        for r in chosen:
            row = {"input_prompt": r.prompt}
            if task == "ti2i":
                row["input_image"] = r.input_paths
                row["input_image_resolution"] = [list(r.size) for _ in r.inputs]
            row["output_image"] = r.output_path
            row["output_image_resolution"] = list(r.size)
            rows.append(row)
        _write_json(out / f"{stem}.json", rows)
        files = [f for r in chosen for f in _image_files(r)]
        for n, part in enumerate(_parts(files, images_per_part), start=1):
            write_tar(out / f"{stem}_part_{n}.tar", part)


ECHO4O_SUBSETS = {"t2i": "Instruction-Following-Image", "ti2i": "Multi-Reference-Image"}


def write_echo4o(records: list[SampleRecord], out: Path, images_per_part: int = 40) -> None:
    """Echo-4o-Image layout: `<Subset>/<Subset>.jsonl`, images in `<Subset>/images/part_N.tar.gz`."""
    for task, subset in ECHO4O_SUBSETS.items():
        chosen = [r for r in records if r.task == task]
        folder = out / subset
        (folder / "images").mkdir(parents=True)
        rows = []
        for r in chosen:
            row = {"instruction": r.prompt, "output_image": f"images/{r.name}.png", "type": subset,
                   "task_type": "multi_reference" if task == "ti2i" else "instruction_following"}
            if task == "ti2i":
                row["input_images"] = [f"images/{p.removeprefix('image/')}" for p in r.input_paths]
            rows.append(row)
        _write_jsonl(folder / f"{subset}.jsonl", rows)
        # Members are named relative to the images/ folder, as in the released archives.
        files = [(name.removeprefix("image/"), data) for r in chosen for name, data in _image_files(r)]
        for n, part in enumerate(_parts(files, images_per_part), start=1):
            write_tar(folder / "images" / f"part_{n}.tar.gz", part, compress=True)


def write_jsonl(records: list[SampleRecord], out: Path) -> None:
    """Plain layout: `records.jsonl` with ids and tasks, images as files under `images/`."""
    (out / "images").mkdir(parents=True)
    rows = []
    for r in records:
        row = {"id": r.name, "task": r.task, "prompt": r.prompt, "output_image": f"images/{r.name}.png"}
        if r.inputs:
            row["input_images"] = [f"images/{p.removeprefix('image/')}" for p in r.input_paths]
        rows.append(row)
        for name, data in _image_files(r):
            (out / "images" / name.removeprefix("image/")).write_bytes(data)
    _write_jsonl(out / "records.jsonl", rows)


def write_sample_dataset(out: str | Path, layout: str = "sharegpt4o", seed: int = 0, num_t2i: int = 48,
                         num_ti2i: int = 32, overwrite: bool = False) -> list[SampleRecord]:
    """Writes the sample dataset into a local folder.

    Args:
        out: the folder; it must not exist or be empty, unless `overwrite`.
        layout: "sharegpt4o", "echo4o" or "jsonl".
        seed, num_t2i, num_ti2i: see `sample_records`.
        overwrite: delete `out` first.

    Returns:
        The records written.

    Raises:
        FileExistsError: `out` holds files and `overwrite` is false.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    records = sample_records(seed, num_t2i, num_ti2i)
    {"sharegpt4o": write_sharegpt4o, "echo4o": write_echo4o, "jsonl": write_jsonl}[layout](records, out)
    return records
