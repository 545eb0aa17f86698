"""Untrusted image bytes -> an RGB image at the model's side, or a reason it cannot be one.

Every image of a raw dataset passes through `prepare_image`: the header's size is checked
against a pixel limit before any pixel is decoded, the file is verified and fully decoded (so a
truncated file fails here, not in training), EXIF rotation is applied, any mode becomes RGB
(transparency composited on white) and the result is letterboxed to the model's square side.

`letterbox` is the one way an image becomes square anywhere in janus-lab (ingest targets and
inputs here; engine inputs, server uploads and evaluation inputs through
`janus_lab.model.vq.image_to_tensor`): Janus's own image processor does the same, so the model
sees images the way Janus-Pro was trained on them, undistorted.
"""

from __future__ import annotations

import contextlib
import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from janus_lab.data.schema import IMAGE_TOO_LARGE, UNREADABLE_IMAGE

WHITE = (255, 255, 255)
LETTERBOX_GREY = (127, 127, 127)
"""Fill of the letterbox bars: Janus's `int(255 * m)` for its image mean m = 0.5
(`janus_lab.model.tokenizer.IMAGE_MEAN`; not imported, the ingest driver never loads the model)."""
LETTERBOX_MIN_SIDE = 14
"""Shortest side a letterboxed image keeps (Janus's `min_size`), so a thin strip is not resized to nothing."""


class ImageRejected(ValueError):
    """An image that cannot be used; `category` is one of the reject categories."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


@contextlib.contextmanager
def _pil_bomb_check_off() -> Iterator[None]:
    # PIL refuses headers above 2 x MAX_IMAGE_PIXELS with its own DecompressionBombError while
    # opening, before our limit can be checked; our limit (checked before decoding) replaces it.
    # Ray Data runs one task per worker process at a time, so the global is not raced.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens image bytes, refusing oversized headers before decoding, and decodes them fully.

    Raises:
        ImageRejected: `image too large` (header over `max_pixels`) or `unreadable image`
            (not an image, corrupt, or truncated).
    """
    with _pil_bomb_check_off():
        try:
            header = Image.open(io.BytesIO(data))
        except Exception as err:  # decoders raise many types on hostile input
            raise ImageRejected(UNREADABLE_IMAGE, _describe(err)) from None
        width, height = header.size
        if width * height > max_pixels:
            raise ImageRejected(IMAGE_TOO_LARGE, f"header claims {width}x{height} = {width * height} pixels, "
                                                 f"over the limit of {max_pixels}")
        try:
            header.verify()  # checksums (PNG CRCs); the image must be reopened afterwards
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as err:
            raise ImageRejected(UNREADABLE_IMAGE, _describe(err)) from None
    return image


def _describe(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white, 16-bit greys keep their range."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        # convert("RGB") clips 16-bit values at 255, which turns most of the image white.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


def letterbox(image: Image.Image, side: int) -> Image.Image:
    """Fits an image into a `side` x `side` square without distorting it, as Janus's processor does.

    The long side is resized to `side` and the short side in proportion (truncated to whole pixels,
    at least `LETTERBOX_MIN_SIDE`), bicubic; the result is centred on a square of `LETTERBOX_GREY`,
    so a 1536 x 1024 image becomes a `side`-wide band between two grey bars. A square image is
    only resized.

    Args:
        image: any PIL image; it is converted to RGB first.
        side: the square's side in pixels.

    Returns:
        An RGB image of `side` x `side`.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    longest = max(width, height)
    # Janus's expression, operation for operation, so the truncation lands on the same pixel. Its
    # 14 px floor is capped at `side`: a square smaller than 14 px (tests) would not hold the image.
    shortest = min(LETTERBOX_MIN_SIDE, side)
    size = (max(int(width / longest * side), shortest), max(int(height / longest * side), shortest))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    if size == (side, side):
        return image
    square = Image.new("RGB", (side, side), LETTERBOX_GREY)
    square.paste(image, ((side - size[0]) // 2, (side - size[1]) // 2))
    return square


def prepare_image(data: bytes, max_pixels: int, side: int) -> Image.Image:
    """Untrusted bytes -> the RGB image the model reads, letterboxed to `side` x `side`.

    Raises:
        ImageRejected: see `decode_image`.
    """
    image = decode_image(data, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        pass
    return letterbox(to_rgb(image), side)


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes of an image (lossless, so decoding gives back exactly these pixels)."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def decode_png_pixels(png: bytes) -> np.ndarray:
    """PNG bytes (as `encode_png` writes them) -> uint8 RGB pixels, (H, W, 3)."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
