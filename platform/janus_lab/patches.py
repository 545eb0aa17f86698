"""The geometry every part shares: one VQ code stands for a 16 x 16 pixel patch.

It lives outside `janus_lab.model` so that drivers which never load a model (ingest's, the
fine-tuning preflight's) need not import torch and transformers to know it.
"""

PATCH_SIZE = 16
"""Pixels per side of the patch one VQ code (and one SigLIP token) covers in every Janus model."""


def num_image_tokens(image_size: int) -> int:
    """VQ codes per image of `image_size` pixels a side: 576 at 384 px, 16 at 64 px."""
    return (image_size // PATCH_SIZE) ** 2
