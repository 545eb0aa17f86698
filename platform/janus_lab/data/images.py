"""Untrusted image bytes -> an RGB image at the model's side, or a reason it cannot be one.

Every image of a raw dataset passes through `prepare_image`: the header's size is checked
against a pixel limit before any pixel is decoded, the file is verified and fully decoded (so a
truncated file fails here, not in training), EXIF rotation is applied, any mode becomes RGB
(transparency composited on white) and the result is resized to the model's square side exactly
as `janus_lab.model.vq.image_to_tensor` does.
"""

from __future__ import annotations

import contextlib
import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from janus_lab.data.schema import IMAGE_TOO_LARGE, UNREADABLE_IMAGE

WHITE = (255, 255, 255)


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


def resize_to_side(image: Image.Image, side: int) -> Image.Image:
    """Resizes to `side` x `side` with the same filter as `janus_lab.model.vq.image_to_tensor`."""
    if image.size == (side, side):
        return image
    return image.resize((side, side), Image.Resampling.BICUBIC)


def prepare_image(data: bytes, max_pixels: int, side: int) -> Image.Image:
    """Untrusted bytes -> the RGB image the model reads, `side` x `side`.

    Raises:
        ImageRejected: see `decode_image`.
    """
    image = decode_image(data, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        pass
    return resize_to_side(to_rgb(image), side)


def encode_png(image: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes of an image (lossless, so decoding gives back exactly these pixels)."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def decode_png_pixels(png: bytes) -> np.ndarray:
    """PNG bytes (as `encode_png` writes them) -> uint8 RGB pixels, (H, W, 3)."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
