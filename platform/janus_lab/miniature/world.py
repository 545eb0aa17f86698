"""The miniature world: flat shapes on plain backgrounds, drawn exactly, at 64 px.

It is the study in small. A text-to-image record pairs a scene with a prompt
("a red circle on a blue background"); an editing record pairs one or two input scenes and an
instruction ("make the background green", "move the square to the left", "put the shape of the
second image on the background of the first") with the exact scene the instruction asks for.
Every scene is a `Scene` value, so the scorer (`janus_lab.miniature.score`) knows what each
image should show.

Some canonical scenes (one large centred shape) are held out: no training record shows them,
in input or output, so evaluation on them measures generalisation to unseen combinations of
shape, shape colour and background.
"""

from __future__ import annotations

import json
import random
import shutil
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw

from janus_lab.data.sample import RecordFiles

SIDE = 64
"""Pixels per side of every image of the world (the `mini` model's image size)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25), "green": (30, 180, 60), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 16, "medium": 24, "large": 32}
"""Width in pixels; `large` is half the image."""
POSITIONS: dict[str, tuple[int, int]] = {
    "center": (32, 32), "left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48),
}
"""Centre of the shape's bounding box, in pixels."""
WHERE = {"center": "in the center", "left": "on the left", "right": "on the right",
         "top": "at the top", "bottom": "at the bottom"}

HELD_OUT_FRACTION = 0.2
HELD_OUT_SEED = 1234


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour, size name and position name."""

    kind: str
    color: str
    size: str = "large"
    position: str = "center"

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""
        cx, cy = POSITIONS[self.position]
        half = SIZES[self.size] / 2
        return cx - half, cy - half, cx + half, cy + half


@dataclass(frozen=True)
class Scene:
    """Shapes of distinct kinds and colours on a plain background of another colour."""

    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        kinds = [s.kind for s in self.shapes]
        colors = [s.color for s in self.shapes]
        if len(set(kinds)) != len(kinds) or len(set(colors)) != len(colors) or self.background in colors:
            raise ValueError(f"a scene has distinct kinds and colours, none the background's: {self}")

    def render(self, side: int = SIDE) -> Image.Image:
        """The scene drawn exactly (no anti-aliasing), `side` pixels square."""
        image = Image.new("RGB", (side, side), COLORS[self.background])
        draw = ImageDraw.Draw(image)
        scale = side / SIDE
        for shape in self.shapes:
            x0, y0, x1, y1 = (v * scale for v in shape.box())
            color = COLORS[shape.color]
            if shape.kind == "circle":
                draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=color)
            elif shape.kind == "square":
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
            elif shape.kind == "triangle":
                draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=color)
            else:
                raise ValueError(f"unknown shape {shape.kind!r}")
        return image

    def shape(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)

    @property
    def canonical(self) -> tuple[str, str, str] | None:
        """(colour, kind, background) when the scene is one large centred shape, else None."""
        if len(self.shapes) == 1 and self.shapes[0].size == "large" and self.shapes[0].position == "center":
            return self.shapes[0].color, self.shapes[0].kind, self.background
        return None


def describe(scene: Scene) -> str:
    """The text-to-image prompt of a scene.

    One large centred shape reads `a {colour} {shape} on a {colour} background`; other scenes
    name each shape's size and place.
    """
    if scene.canonical:
        color, kind, background = scene.canonical
        return f"a {color} {kind} on a {background} background"
    parts = [f"a {s.size} {s.color} {s.kind} {WHERE[s.position]}" for s in scene.shapes]
    return f"{' and '.join(parts)} on a {scene.background} background"


def all_canonical() -> list[tuple[str, str, str]]:
    """Every (colour, kind, background) of a one-shape canonical scene: 6 x 3 x 5 = 90."""
    return [(c, k, b) for k in SHAPES for c in COLORS for b in COLORS if b != c]


def held_out_canonical(fraction: float = HELD_OUT_FRACTION, seed: int = HELD_OUT_SEED) -> frozenset:
    """The canonical scenes no training record shows (a fixed, seeded 20% of the 90)."""
    combos = all_canonical()
    rng = random.Random(seed)
    return frozenset(rng.sample(combos, round(len(combos) * fraction)))


def canonical_scene(color: str, kind: str, background: str) -> Scene:
    return Scene(background, (Shape(kind, color),))


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class WorldRecord(RecordFiles):
    """One record: what the dataset writers need, plus the scenes and the edit for scoring.

    `edit` names what the instruction changes ("background", "recolor", "move", "add", "remove",
    "compose"); `target` is the kind of the shape it concerns, if any.
    """

    name: str
    task: str
    prompt: str
    output: Scene
    inputs: tuple[Scene, ...] = ()
    edit: str | None = None
    target: str | None = None
    size: tuple[int, int] = field(default=(SIDE, SIDE))

    def output_image(self) -> Image.Image:
        return self.output.render()

    def input_images(self) -> list[Image.Image]:
        return [scene.render() for scene in self.inputs]

    def to_json(self) -> dict:
        """A JSON-able description (for evaluation sets and requests files)."""
        return {"name": self.name, "task": self.task, "prompt": self.prompt, "edit": self.edit,
                "target": self.target, "output": scene_to_json(self.output),
                "inputs": [scene_to_json(s) for s in self.inputs]}


def scene_to_json(scene: Scene) -> dict:
    return {"background": scene.background,
            "shapes": [{"kind": s.kind, "color": s.color, "size": s.size, "position": s.position}
                       for s in scene.shapes]}


def scene_from_json(data: dict) -> Scene:
    return Scene(data["background"], tuple(Shape(**s) for s in data["shapes"]))


def record_from_json(data: dict) -> WorldRecord:
    return WorldRecord(data["name"], data["task"], data["prompt"], scene_from_json(data["output"]),
                       tuple(scene_from_json(s) for s in data["inputs"]), data.get("edit"), data.get("target"))


# --------------------------------------------------------------------------- drawing scenes


def random_scene(rng: random.Random, num_shapes: int | None = None, canonical: bool | None = None) -> Scene:
    """A scene of the world's distribution: a canonical scene, one placed shape, or two."""
    if canonical is None and num_shapes is None:
        canonical = rng.random() < 0.4
    if canonical:
        color, kind, background = rng.choice(all_canonical())
        return canonical_scene(color, kind, background)
    num_shapes = num_shapes or rng.choice((1, 1, 2))
    colors = rng.sample(list(COLORS), num_shapes + 1)
    kinds = rng.sample(SHAPES, num_shapes)
    if num_shapes == 1:
        return Scene(colors[0], (Shape(kinds[0], colors[1], rng.choice(list(SIZES)), rng.choice(list(POSITIONS))),))
    # Two shapes sit on opposite sides so they never overlap.
    places = rng.choice((("left", "right"), ("top", "bottom")))
    sizes = [rng.choice(("small", "medium")) for _ in places]
    return Scene(colors[0], tuple(Shape(k, c, s, p) for k, c, s, p in zip(kinds, colors[1:], sizes, places)))


def all_scenes() -> list[Scene]:
    """Every scene `random_scene` can draw, once each: 90 canonical, 1,260 others with one shape
    and 5,760 with two (kinds, colours, sizes and the pair of opposite places)."""
    scenes = [canonical_scene(*combo) for combo in all_canonical()]
    for background in COLORS:
        others = [c for c in COLORS if c != background]
        scenes += [Scene(background, (Shape(kind, color, size, place),)) for kind in SHAPES for color in others
                   for size in SIZES for place in POSITIONS
                   if not (size == "large" and place == "center")]
        for places in (("left", "right"), ("top", "bottom")):
            for kinds in ((a, b) for a in SHAPES for b in SHAPES if a != b):
                for colors in ((a, b) for a in others for b in others if a != b):
                    for sizes in ((a, b) for a in ("small", "medium") for b in ("small", "medium")):
                        scenes.append(Scene(background, tuple(Shape(*fields) for fields in
                                                              zip(kinds, colors, sizes, places))))
    return scenes


def _other_color(rng: random.Random, scene: Scene) -> str:
    used = {scene.background, *(s.color for s in scene.shapes)}
    return rng.choice([c for c in COLORS if c not in used])


def edit_scene(rng: random.Random, scene: Scene, edit: str) -> tuple[str, Scene, str | None] | None:
    """Applies one edit of kind `edit` to `scene`: (instruction, edited scene, target kind), or
    None when the edit does not apply (nothing to remove, no free place)."""
    shape = rng.choice(scene.shapes)
    if edit == "background":
        color = _other_color(rng, scene)
        return f"make the background {color}", Scene(color, scene.shapes), None
    if edit == "recolor":
        color = _other_color(rng, scene)
        edited = replace(shape, color=color)
        return f"make the {shape.kind} {color}", _swap(scene, shape, edited), shape.kind
    if edit == "move":
        if len(scene.shapes) != 1:
            return None
        position = rng.choice([p for p in POSITIONS if p != shape.position])
        return f"move the {shape.kind} to the {position}", _swap(scene, shape, replace(shape, position=position)), shape.kind
    if edit == "remove":
        if len(scene.shapes) != 2:
            return None
        return f"remove the {shape.kind}", Scene(scene.background, tuple(s for s in scene.shapes if s != shape)), shape.kind
    if edit == "add":
        if len(scene.shapes) != 1 or shape.position not in ("left", "right", "top", "bottom") or shape.size == "large":
            return None
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[shape.position]
        kind = rng.choice([k for k in SHAPES if k != shape.kind])
        added = Shape(kind, _other_color(rng, scene), rng.choice(("small", "medium")), opposite)
        return (f"add a {added.size} {added.color} {kind} {WHERE[opposite]}",
                Scene(scene.background, scene.shapes + (added,)), kind)
    raise ValueError(f"unknown edit {edit!r}")


def _swap(scene: Scene, old: Shape, new: Shape) -> Scene:
    return Scene(scene.background, tuple(new if s == old else s for s in scene.shapes))


def compose(first: Scene, second: Scene) -> tuple[str, Scene] | None:
    """The two-input edit: the shapes of `second` on the background of `first`."""
    if first.background in {s.color for s in second.shapes}:
        return None
    return "put the shapes of the second image on the background of the first", Scene(first.background, second.shapes)


ONE_INPUT_EDITS = ("background", "recolor", "move", "add", "remove")
EDIT_KINDS = ONE_INPUT_EDITS + ("compose",)


def _source_for(edit: str, rng: random.Random) -> Scene:
    if edit == "remove":
        return random_scene(rng, num_shapes=2)
    if edit == "add":
        while True:
            scene = random_scene(rng, num_shapes=1)
            if scene.shapes[0].position != "center" and scene.shapes[0].size != "large":
                return scene
    if edit == "move":
        return random_scene(rng, num_shapes=1) if rng.random() < 0.6 else random_scene(rng, canonical=True)
    return random_scene(rng)


def is_held_out(scene: Scene, held_out: frozenset) -> bool:
    """Whether no training record may show `scene`.

    A one-shape canonical scene is held out when its (colour, kind, background) is in
    `held_out`; a two-shape scene when its background and (kind, colour) pairs fall in a fixed
    fifth of all such combinations (a stable hash, the same on every machine).
    """
    if len(scene.shapes) == 2:
        key = scene.background + "|" + "|".join(sorted(f"{s.kind}:{s.color}" for s in scene.shapes))
        return zlib.crc32(key.encode()) % 5 == 0
    return scene.canonical in held_out


def _touches(record: WorldRecord, held_out: frozenset) -> bool:
    return any(is_held_out(scene, held_out) for scene in (record.output, *record.inputs))


def make_edit(rng: random.Random, name: str, edit: str) -> WorldRecord | None:
    """One editing record of kind `edit`, or None when the drawn scenes do not allow it."""
    if edit == "compose":
        first, second = random_scene(rng), random_scene(rng, num_shapes=1)
        made = compose(first, second)
        if made is None:
            return None
        return WorldRecord(name, "ti2i", made[0], made[1], (first, second), "compose", None)
    source = _source_for(edit, rng)
    made = edit_scene(rng, source, edit)
    if made is None:
        return None
    instruction, output, target = made
    return WorldRecord(name, "ti2i", instruction, output, (source,), edit, target)


def training_records(seed: int, num_t2i: int, num_edits: int, held_out: frozenset | None = None,
                     edits: Iterable[str] = EDIT_KINDS) -> list[WorldRecord]:
    """Records for training: none shows a held-out canonical scene.

    Args:
        seed: seed of every choice; the same arguments give the same records.
        num_t2i: text-to-image records.
        num_edits: editing records, spread evenly over `edits`.
        held_out: canonical scenes to keep out (default: `held_out_canonical()`).
    """
    held_out = held_out_canonical() if held_out is None else held_out
    rng = random.Random(seed)
    records: list[WorldRecord] = []
    while len(records) < num_t2i:
        scene = random_scene(rng)
        if not is_held_out(scene, held_out):
            records.append(WorldRecord(f"t2i_{len(records):05d}", "t2i", describe(scene), scene))
    edits = tuple(edits)
    count = 0
    while count < num_edits:
        record = make_edit(rng, f"ti2i_{count:05d}", edits[count % len(edits)])
        if record is not None and not _touches(record, held_out):
            records.append(record)
            count += 1
    return records


def evaluation_records(per_kind: int = 15, seed: int = 7, held_out: frozenset | None = None) -> list[WorldRecord]:
    """Held-out evaluation records: each shows a held-out scene (`is_held_out`).

    Text-to-image: the canonical prompt of every held-out canonical scene. Edits: `per_kind`
    records of each edit kind with a held-out scene as input or output.
    """
    held_out = sorted(held_out_canonical() if held_out is None else held_out)
    rng = random.Random(seed)
    records = [WorldRecord(f"eval_t2i_{i:03d}", "t2i", describe(canonical_scene(*c)), canonical_scene(*c))
               for i, c in enumerate(held_out)]
    for edit in EDIT_KINDS:
        found = 0
        attempts = 0
        while found < per_kind:
            attempts += 1
            if attempts > 100000:
                raise RuntimeError(f"cannot draw {per_kind} held-out {edit} edits")
            record = make_edit(rng, f"eval_{edit}_{found:03d}", edit)
            if record is not None and _touches(record, frozenset(held_out)):
                records.append(record)
                found += 1
    return records


def write_world_dataset(out: str | Path, records: list[WorldRecord], layout: str = "sharegpt4o",
                        overwrite: bool = False) -> None:
    """Writes records in a real dataset layout (`sharegpt4o` or `echo4o`), ready for ingest.

    ShareGPT-4o-Image holds text-to-image and editing records (two inputs in one
    `input_image` list); Echo-4o-Image's Multi-Reference-Image subset holds the two-input ones.
    """
    from janus_lab.data.sample import write_echo4o, write_sharegpt4o

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    writers = {"sharegpt4o": write_sharegpt4o, "echo4o": write_echo4o}
    if layout not in writers:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(writers)}")
    writers[layout](records, out, images_per_part=500)


def write_eval_requests(folder: str | Path, records: list[WorldRecord] | None = None, samples: int = 1,
                        seed: int = 0) -> Path:
    """Writes held-out records as a generation requests file (`jobs/generate.py requests=...`).

    `<folder>/requests.jsonl` has one request per record (prompt, input image paths relative to
    the file, `parallel_size`, a seed); `<folder>/targets.jsonl` the records, line for line, so
    the scorer knows each target; input images go to `<folder>/images/`.

    Returns:
        The requests file.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = evaluation_records() if records is None else records
    lines = []
    for i, record in enumerate(records):
        paths = []
        for k, image in enumerate(record.input_images()):
            path = f"images/{record.name}_input_{k}.png"
            image.save(folder / path)
            paths.append(path)
        request = {"prompt": record.prompt, "parallel_size": samples, "seed": seed + 1000 * i}
        if paths:
            request["input_images"] = paths
        lines.append(json.dumps(request))
    (folder / "targets.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    out = folder / "requests.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def read_targets(requests_file: str | Path) -> list[WorldRecord]:
    """The records beside a requests file written by `write_eval_requests` (`targets.jsonl`)."""
    path = Path(requests_file).with_name("targets.jsonl")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: world scoring needs the targets written with the requests "
                                f"(python jobs/sample_data.py --world mini --eval-requests FOLDER)")
    return [record_from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
