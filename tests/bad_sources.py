"""Source folders and images for the ingest tests: bad records of every kind, and the reference
letterbox (Janus's published resize-and-pad, written out)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from janus_lab.data.sample import write_tar



def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (its pixel data is for 1x1)."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1), "red")))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def scene(color: str = "red", size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((0, 0, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image if mode == "RGB" else image.convert(mode)


def write_bad_source(root: Path) -> dict[tuple[str, int], str]:
    """A ShareGPT-4o-Image folder where most records are broken in one way each.

    Returns:
        `(source_file, record_index) -> reject category` of every record that must be rejected;
        the others must be ingested.
    """
    root.mkdir(parents=True)
    (root.parent / "outside.png").write_bytes(png_bytes(scene()))  # exists, must never be read
    image_dir = root / "image"
    image_dir.mkdir()
    files = {
        "rgba.png": png_bytes(Image.new("RGBA", (64, 48), (255, 0, 0, 0))),
        "palette.png": png_bytes(scene("green", mode="P")),
        "grey.png": png_bytes(scene("white", mode="L")),
        "blank_prompt.png": png_bytes(scene("white")),
        "long_prompt.png": png_bytes(scene("white")),
        "edit_out_2.png": png_bytes(scene("white")),
        "edit_out_4.png": png_bytes(scene("white")),
        "cmyk.jpg": png_bytes(scene("yellow", mode="CMYK"), "JPEG"),
        "truncated.png": half(png_bytes(scene())),
        "garbage.png": b"this is not an image at all",
        "bomb.png": bomb_png(),
        "too_big.png": png_bytes(Image.new("RGB", (400, 400), "gray")),  # valid, over the test limit
        "edit_input.png": png_bytes(scene("blue")),
        "edit_truncated.png": half(png_bytes(scene("blue"))),
    }
    for name, data in files.items():
        (image_dir / name).write_bytes(data)
    write_tar(root / "text_to_image_part_1.tar", [("image/tar_good.png", png_bytes(scene("purple"))),
                                                  ("image/tar_input.png", png_bytes(scene("orange")))])
    long_prompt = " ".join(["a red circle next to a blue square"] * 40)
    t2i = [
        {"input_prompt": "a good one from a tar", "output_image": "image/tar_good.png"},  # 0 ok
        {"input_prompt": "transparent red, on white", "output_image": "image/rgba.png"},  # 1 ok
        {"input_prompt": "a palette image", "output_image": "image/palette.png"},  # 2 ok
        {"input_prompt": "missing", "output_image": "image/nowhere.png"},  # 3
        {"input_prompt": "truncated", "output_image": "image/truncated.png"},  # 4
        {"input_prompt": "garbage", "output_image": "image/garbage.png"},  # 5
        {"input_prompt": "escape", "output_image": "../outside.png"},  # 6
        {"input_prompt": "absolute", "output_image": "/etc/hostname"},  # 7
        {"input_prompt": "bomb", "output_image": "image/bomb.png"},  # 8
        {"input_prompt": "   \n\t", "output_image": "image/blank_prompt.png"},  # 9
        {"input_prompt": long_prompt, "output_image": "image/long_prompt.png"},  # 10
        {"input_prompt": "same output as record 0", "output_image": "image/./tar_good.png"},  # 11
        {"input_prompt": "a cmyk jpeg", "output_image": "image/cmyk.jpg"},  # 12
        "not a record",  # 13
        {"input_prompt": "a grey image", "output_image": "image/grey.png"},  # 14 ok
        {"input_prompt": "valid but larger than the limit", "output_image": "image/too_big.png"},  # 15
    ]
    ti2i = [
        {"input_prompt": "make it green", "input_image": ["image/tar_input.png"], "output_image": "image/palette.png"},
        {"input_prompt": "combine them", "input_image": ["image/edit_input.png", "image/tar_input.png"],
         "output_image": "image/cmyk.jpg"},  # 1 ok, two inputs
        {"input_prompt": "no inputs", "input_image": [], "output_image": "image/edit_out_2.png"},  # 2
        {"input_prompt": "no input key", "output_image": "image/rgba.png"},  # 3
        {"input_prompt": "missing input", "input_image": ["image/nope.png"],
         "output_image": "image/edit_out_4.png"},  # 4
        {"input_prompt": "truncated input", "input_image": ["image/edit_truncated.png"],
         "output_image": "image/edit_input.png"},  # 5
    ]
    (root / "text_to_image.json").write_text(json.dumps(t2i))
    (root / "text_and_image_to_image.json").write_text(json.dumps(ti2i))
    t, e = "text_to_image.json", "text_and_image_to_image.json"
    return {
        (t, 3): "missing image", (t, 4): "unreadable image", (t, 5): "unreadable image",
        (t, 6): "path escapes source root", (t, 7): "path escapes source root", (t, 8): "image too large",
        (t, 9): "empty prompt", (t, 10): "prompt too long", (t, 11): "duplicate id", (t, 13): "malformed record",
        (t, 15): "image too large",
        (e, 2): "no input image", (e, 3): "no input image", (e, 4): "missing image", (e, 5): "unreadable image",
    }


BAD_SOURCE_GOOD = {("text_to_image.json", i) for i in (0, 1, 2, 12, 14)} | {("text_and_image_to_image.json", i)
                                                                             for i in (0, 1)}
BAD_SOURCE_LIMITS = ["limits.max_image_pixels=100000", "limits.max_text_tokens=64"]


def janus_square(image: Image.Image, side: int) -> np.ndarray:
    """DeepSeek Janus's `VLMImageProcessor.resize`, written out from its published description.

    (w, h) -> long side `side`, other side int(x / max(w, h) * side) but >= 14, bicubic; then
    `expand2square`: a square of the mean grey int(0.5 * 255) = 127, the image pasted at
    (0, (W - H) // 2) when wider than tall, at ((H - W) // 2, 0) when taller.
    """
    width, height = image.size
    longest = max(width, height)
    new_height = max(int(height / longest * side), 14)
    new_width = max(int(width / longest * side), 14)
    resized = np.asarray(image.resize((new_width, new_height), resample=Image.BICUBIC))
    if new_width == new_height:
        return resized
    square = np.full((max(new_width, new_height),) * 2 + (3,), 127, dtype=np.uint8)
    if new_width > new_height:
        top = (new_width - new_height) // 2
        square[top:top + new_height, :] = resized
    else:
        left = (new_height - new_width) // 2
        square[:, left:left + new_width] = resized
    return square
