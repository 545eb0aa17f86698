"""VQ tokenizer: images <-> codes (docs/design.md, "VQ codes").

transformers' `JanusVQVAE.encode` searches the nearest code on the raw latent. The original
tokenizer L2-normalises both the latent and the codebook first (decode already normalises the
looked-up entries), and the two disagree on many codes, so encode lives here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import JanusForConditionalGeneration, JanusVQVAE

from janus_lab.data.images import letterbox
from janus_lab.model.tokenizer import IMAGE_MEAN, IMAGE_STD


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """Converts an image to the model's input: RGB, letterboxed to a square side, in [-1, 1].

    The same square as ingest stores (`janus_lab.data.images.letterbox`), so an image fed at
    inference matches the training inputs and targets.

    Returns:
        A float tensor of shape (3, image_size, image_size).
    """
    array = np.asarray(letterbox(image, image_size), dtype=np.float32) / 255.0
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """Converts uint8 HWC (or NHWC) pixels, as stored in shards, to normalised CHW floats."""
    array = torch.tensor(np.asarray(pixels), dtype=torch.float32) / 255.0
    array = (array - IMAGE_MEAN[0]) / IMAGE_STD[0]
    return array.movedim(-1, -3).contiguous()


@torch.no_grad()
def encode_vq_codes(model: JanusForConditionalGeneration | JanusVQVAE, pixel_values: torch.Tensor) -> torch.Tensor:
    """Encodes images into VQ codes with the normalised nearest-code search.

    encoder -> quant_conv -> L2-normalise latent and codebook -> nearest code. On unit vectors the
    nearest code by Euclidean distance is the one with the largest dot product.

    Args:
        model: a Janus model (only its frozen VQ tokenizer is used), or the VQ tokenizer alone.
        pixel_values: (B, 3, H, W) in [-1, 1].

    Returns:
        (B, N) int64 codes in raster order.
    """
    vq = model if isinstance(model, JanusVQVAE) else model.model.vqmodel
    weight = vq.quantize.embedding.weight
    latent = vq.quant_conv(vq.encoder(pixel_values.to(device=weight.device, dtype=weight.dtype)))
    latent = F.normalize(latent.float().permute(0, 2, 3, 1).flatten(1, 2), dim=-1)  # (B, N, D)
    codebook = F.normalize(weight.float(), dim=-1)  # (K, D)
    return torch.einsum("bnd,kd->bnk", latent, codebook).argmax(dim=-1)


@torch.no_grad()
def decode_vq_codes(model: JanusForConditionalGeneration, codes: torch.Tensor) -> torch.Tensor:
    """Decodes (B, N) codes to images, NHWC floats in about [-1, 1]."""
    weight = model.model.vqmodel.quantize.embedding.weight
    return model.decode_image_tokens(codes.to(device=weight.device, dtype=torch.long))


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """Turns NHWC floats in [-1, 1] (what `decode_vq_codes` returns) into PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in array]
