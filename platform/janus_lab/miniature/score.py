"""An exact scorer for the miniature world, in the spirit of GenEval: it reads the image.

Every pixel is assigned the nearest of the world's six colours. The background is the colour
of most border pixels; every other colour's connected regions of at least `MIN_AREA` pixels,
once fringes one or two pixels wide are opened away, are shapes. A shape's kind comes from how
much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2), its size from the
box's width and its position from the box's centre.

Checks are named attributes of the target scene (`background`, `count`, and per shape kind
`<kind>.present`, `<kind>.color`, `<kind>.size`, `<kind>.position`), so a score says what was
right. Text-to-image scores the attributes the prompt states; an edit's score splits into
*following* (the attributes the instruction changes) and *preservation* (those it must leave
alone). A sample is correct when every checked attribute is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from janus_lab.miniature.world import (COLORS, POSITIONS, SHAPES, SIDE, SIZES, Scene, WorldRecord,
                                       random_scene)

MIN_AREA = 24
"""Pixels a region needs to count as a shape (a small square has 256, a small triangle ~128)."""
_PALETTE = np.asarray(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


@dataclass(frozen=True)
class Detected:
    """One shape found in an image."""

    kind: str
    color: str
    size: str
    position: str
    area: int


@dataclass(frozen=True)
class Reading:
    """What the scorer reads off an image."""

    background: str
    shapes: tuple[Detected, ...]

    def find(self, kind: str) -> Detected | None:
        """The largest detected shape of `kind`, if any."""
        found = [s for s in self.shapes if s.kind == kind]
        return max(found, key=lambda s: s.area) if found else None


def read_image(image: Image.Image) -> Reading:
    """Reads the background and the shapes off an image of the world (any size, resized to 64 px)."""
    rgb = image.convert("RGB")
    if rgb.size != (SIDE, SIDE):
        rgb = rgb.resize((SIDE, SIDE), Image.Resampling.NEAREST)
    pixels = np.asarray(rgb, dtype=np.float32)
    labels = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1).argmin(-1)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    shapes = []
    for color in range(len(_NAMES)):
        if color == background:
            continue
        # An opening drops fringes one or two pixels wide: a decoder's soft edge between two
        # colours can land nearest a third (grey between white and black reads green) and would
        # count as a shape. The world's narrowest shape is 16 px wide, so no real shape is lost
        # (every exact render still reads right, tests/test_miniature.py).
        regions, count = ndimage.label(ndimage.binary_opening(labels == color))
        for index, box in enumerate(ndimage.find_objects(regions), start=1):
            area = int((regions[box] == index).sum())
            if area >= MIN_AREA:
                shapes.append(_describe_region(box, area, _NAMES[color]))
    return Reading(_NAMES[background], tuple(shapes))


def _describe_region(box: tuple[slice, slice], area: int, color: str) -> Detected:
    height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
    fill = area / (height * width)
    kind = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    extent = max(height, width)
    size = min(SIZES, key=lambda name: abs(SIZES[name] - extent))
    cx, cy = (box[1].start + box[1].stop) / 2, (box[0].start + box[0].stop) / 2
    position = min(POSITIONS, key=lambda name: (POSITIONS[name][0] - cx) ** 2 + (POSITIONS[name][1] - cy) ** 2)
    return Detected(kind, color, size, position, area)


def scene_attributes(scene: Scene, stated: tuple[str, ...] = ("color", "size", "position")) -> dict[str, str]:
    """The checkable attributes of a target scene; shape attributes limited to `stated`."""
    attributes = {"background": scene.background, "count": str(len(scene.shapes))}
    for shape in scene.shapes:
        attributes[f"{shape.kind}.present"] = "yes"
        for name in stated:
            attributes[f"{shape.kind}.{name}"] = getattr(shape, name)
    return attributes


def reading_attributes(reading: Reading, keys: list[str]) -> dict[str, str]:
    """The same attributes, as read off an image."""
    values = {}
    for key in keys:
        if key == "background":
            values[key] = reading.background
        elif key == "count":
            values[key] = str(len(reading.shapes))
        else:
            kind, name = key.split(".")
            found = reading.find(kind)
            values[key] = ("yes" if found else "no") if name == "present" else getattr(found, name, None)
    return values


def changed_keys(record: WorldRecord) -> set[str]:
    """The attributes an edit's instruction changes (the rest it must preserve)."""
    target = scene_attributes(record.output)
    source = scene_attributes(record.inputs[0]) if record.inputs else {}
    if record.edit == "compose":
        # The shapes come from the second image, the background from the first.
        return {k for k in target if k != "background"}
    keys = {k for k in target if source.get(k) != target[k]}
    if record.edit == "remove":
        keys |= {f"{record.target}.present"}
    return keys


@dataclass
class SampleScore:
    """One sample's checks: attribute -> right or wrong."""

    record: WorldRecord
    checks: dict[str, bool]
    changed: set[str] = field(default_factory=set)

    @property
    def correct(self) -> bool:
        return all(self.checks.values())

    @property
    def following(self) -> bool:
        return all(v for k, v in self.checks.items() if k in self.changed)

    @property
    def preservation(self) -> bool:
        return all(v for k, v in self.checks.items() if k not in self.changed)


def _prompt_states(record: WorldRecord) -> tuple[str, ...]:
    # The canonical prompt names colour and kind only; other prompts name size and place too.
    return ("color",) if record.output.canonical else ("color", "size", "position")


def score_sample(record: WorldRecord, image: Image.Image) -> SampleScore:
    """Scores one generated image against its record's target scene."""
    reading = read_image(image)
    if record.task == "t2i":
        target = scene_attributes(record.output, _prompt_states(record))
        changed: set[str] = set(target)
    else:
        target = scene_attributes(record.output)
        changed = changed_keys(record)
        if record.edit == "remove":
            target[f"{record.target}.present"] = "no"
    read = reading_attributes(reading, list(target))
    return SampleScore(record, {k: read[k] == v for k, v in target.items()}, changed)


WORLD_METRICS = ("t2i", "edit", "following", "preservation", "compose")


def world_metrics(summary: dict[str, float]) -> dict[str, float]:
    """A summary as tracked metrics: `world_<score>` and `world_mean`, the mean of the
    text-to-image and edit scores (what the CFG sweep and promotion rank models by)."""
    metrics = {f"world_{key}": summary.get(key, 0.0) for key in WORLD_METRICS}
    metrics["world_mean"] = (metrics["world_t2i"] + metrics["world_edit"]) / 2
    return metrics


def summarise(scores: list[SampleScore]) -> dict[str, float]:
    """Mean scores: `t2i` (prompt following), `edit` (correct edits), `following`, `preservation`,
    `compose` (two-input edits correct), and per edit kind `edit.<kind>`."""
    t2i = [s for s in scores if s.record.task == "t2i"]
    edits = [s for s in scores if s.record.task == "ti2i"]
    mean = lambda values: float(np.mean(values)) if values else float("nan")
    summary = {"t2i": mean([s.correct for s in t2i]), "edit": mean([s.correct for s in edits]),
               "following": mean([s.following for s in edits]),
               "preservation": mean([s.preservation for s in edits]),
               "compose": mean([s.correct for s in edits if s.record.edit == "compose"])}
    for kind in sorted({s.record.edit for s in edits}):
        summary[f"edit.{kind}"] = mean([s.correct for s in edits if s.record.edit == kind])
    return {k: v for k, v in summary.items() if v == v}


def chance_scores(records: list[WorldRecord], draws: int = 20, seed: int = 0) -> dict[str, float]:
    """What drawing a random scene of the world, ignoring the prompt and the inputs, scores."""
    rng = random.Random(seed)
    scores = [score_sample(r, random_scene(rng).render()) for _ in range(draws) for r in records]
    return summarise(scores)


def copy_input_scores(records: list[WorldRecord]) -> dict[str, float]:
    """What returning the (first) input image unchanged scores on edits."""
    return summarise([score_sample(r, r.inputs[0].render()) for r in records if r.inputs])


__all__ = ["read_image", "score_sample", "summarise", "chance_scores", "copy_input_scores", "SHAPES"]
