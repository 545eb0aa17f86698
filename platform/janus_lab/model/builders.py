"""One builder per model size, plus `debug`: random-init Janus models and their processors.

Shapes of `janus_pro_1b` / `janus_pro_7b` follow the released Janus-Pro checkpoints (language
model, SigLIP-L/16 at 384 px, VQ codebook 16384 x 8 on a 24 x 24 grid, untied lm_head), so a
random-init model benchmarks like the real one. Fine-tuning starts from real weights loaded with
`janus_lab.model.weights.load_pretrained`; these builders give the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor

from janus_lab.model.tokenizer import SpecialTokenIds, build_debug_tokenizer, build_processor
from janus_lab.patches import PATCH_SIZE, num_image_tokens

VQ_CODEBOOK_SIZE = 16384
VQ_EMBED_DIM = 8
# Five VQ resolutions halve the side four times: 384 px -> 24 x 24 codes, one per SigLIP patch.
VQ_CHANNEL_MULTIPLIER = (1, 1, 2, 2, 4)


@dataclass
class JanusBundle:
    """A Janus model with the processor (tokenizer + image processor) that belongs to it."""

    model: JanusForConditionalGeneration
    processor: JanusProcessor
    preset: str

    @property
    def special_ids(self) -> SpecialTokenIds:
        """Ids of BOS/pad/image/boi/eoi in this model's vocabulary."""
        return SpecialTokenIds.from_tokenizer(self.processor.tokenizer)

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the model reads and writes."""
        return int(self.model.config.vision_config.image_size)

    @property
    def num_image_tokens(self) -> int:
        """Codes per image (N in docs/design.md, "Sequence layout")."""
        return num_image_tokens(self.image_size)


def janus_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    image_size: int,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
    vq_base_channels: int,
    special_ids: SpecialTokenIds,
    max_positions: int = 16384,
    vq_overrides: dict | None = None,
) -> JanusConfig:
    """Builds a consistent `JanusConfig`.

    transformers accepts unknown or inconsistent sub-config values silently, so the constraints
    the modules rely on are checked here.

    Raises:
        ValueError: if the shapes cannot work together.
    """
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {PATCH_SIZE}")
    grid = image_size // PATCH_SIZE
    vq_grid = image_size // 2 ** (len(VQ_CHANNEL_MULTIPLIER) - 1)
    if vq_grid != grid:
        raise ValueError(f"VQ grid {vq_grid} differs from the SigLIP grid {grid} at image_size {image_size}")
    if vq_base_channels < 32 or vq_base_channels % 32:
        raise ValueError(f"vq_base_channels must be a multiple of 32 (GroupNorm(32)), got {vq_base_channels}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    text_config = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "pad_token_id": special_ids.pad,
        "bos_token_id": special_ids.bos,
        "eos_token_id": special_ids.eos,
        "tie_word_embeddings": False,
    }
    vision_config = {
        "hidden_size": vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": image_size,
        "patch_size": PATCH_SIZE,
        "projection_dim": hidden_size,
        "num_image_tokens": num_image_tokens(image_size),
    }
    vq_config = {
        "embed_dim": VQ_EMBED_DIM,
        "num_embeddings": VQ_CODEBOOK_SIZE,
        "base_channels": vq_base_channels,
        "channel_multiplier": list(VQ_CHANNEL_MULTIPLIER),
        "projection_dim": hidden_size,
        "image_token_embed_dim": hidden_size,
        **(vq_overrides or {}),
    }
    return JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=special_ids.image,
        # The released models have a separate lm_head; JanusConfig would tie it by default.
        tie_word_embeddings=False,
    )


def _instantiate(config: JanusConfig, processor: JanusProcessor, preset: str, seed: int,
                 dtype: torch.dtype, device: str | torch.device) -> JanusBundle:
    torch.manual_seed(seed)
    with torch.device(device):
        model = JanusForConditionalGeneration(config)
    model = model.to(dtype=dtype)
    freeze_vq_tokenizer(model)
    return JanusBundle(model=model, processor=processor, preset=preset)


def freeze_vq_tokenizer(model: JanusForConditionalGeneration) -> None:
    """The VQ tokenizer is never trained: its codes are the targets."""
    model.model.vqmodel.requires_grad_(False)
    model.model.vqmodel.eval()


def debug(image_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> JanusBundle:
    """Tiny random model: 2 layers, hidden 64; 64 px -> 16 codes, or 384 px -> 576 codes."""
    tokenizer = build_debug_tokenizer()
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    config = janus_config(
        vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        image_size=image_size, vision_hidden=32, vision_layers=1, vision_heads=2,
        vq_base_channels=32, special_ids=special, max_positions=4096,
    )
    processor = build_processor(tokenizer, image_size, num_image_tokens(image_size))
    return _instantiate(config, processor, "debug", seed, dtype, device)


def _mini_config(special: SpecialTokenIds) -> JanusConfig:
    from janus_lab.miniature.assets import MINI_VQ

    return janus_config(
        vocab_size=1024, hidden_size=192, num_layers=4, num_heads=6, intermediate_size=512,
        image_size=64, vision_hidden=32, vision_layers=1, vision_heads=2,
        vq_base_channels=MINI_VQ["base_channels"], special_ids=special, max_positions=1024,
        vq_overrides=MINI_VQ,
    )


def mini(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         pretrained: bool = True) -> JanusBundle:
    """The miniature Janus-Pro: 4 layers, hidden 192, 64 px (16 codes), with its trained VQ tokenizer.

    Its weights ship in the repo (`janus_lab/miniature/weights/`): the VQ tokenizer trained on
    the miniature world and a base model pre-trained on its text-to-image data only. It draws
    the world's scenes but has never seen an edit, as Janus-Pro before Janus-4o's fine-tune.

    Args:
        pretrained: load the shipped base model; false keeps a seeded random language model
            (with the trained VQ tokenizer), what pre-training starts from.
    """
    from janus_lab.miniature.assets import load_mini_weights

    tokenizer = build_debug_tokenizer()
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    processor = build_processor(tokenizer, 64, num_image_tokens(64))
    bundle = _instantiate(_mini_config(special), processor, "mini" if pretrained else "mini-init",
                          seed, torch.float32, "cpu")
    load_mini_weights(bundle.model, language_model=pretrained)
    bundle.model.to(device=device, dtype=dtype)
    return bundle


def mini_init(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> JanusBundle:
    """The miniature architecture with its trained VQ tokenizer and a random language model."""
    return mini(seed, dtype, device, pretrained=False)


def _real_shape(preset: str, hidden: int, layers: int, heads: int, ffn: int, seed: int,
                dtype: torch.dtype, device: str | torch.device, num_layers: int | None) -> JanusBundle:
    # Random init at the released shapes; the tokenizer is the local one (any vocabulary that
    # fits in 102400 ids benchmarks the same), real runs load the released tokenizer instead.
    tokenizer = build_debug_tokenizer()
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    config = janus_config(
        vocab_size=102400, hidden_size=hidden, num_layers=num_layers or layers, num_heads=heads,
        intermediate_size=ffn, image_size=384, vision_hidden=1024, vision_layers=24,
        vision_heads=16, vq_base_channels=128, special_ids=special,
    )
    processor = build_processor(tokenizer, 384, num_image_tokens(384))
    return _instantiate(config, processor, preset, seed, dtype, device)


def janus_pro_1b(seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 num_layers: int | None = None) -> JanusBundle:
    """Janus-Pro-1B shapes: hidden 2048, 24 layers, 16 heads, ffn 5632 (random weights)."""
    return _real_shape("janus-pro-1b", 2048, 24, 16, 5632, seed, dtype, device, num_layers)


def janus_pro_7b(seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 num_layers: int | None = None) -> JanusBundle:
    """Janus-Pro-7B shapes: hidden 4096, 30 layers, 32 heads, ffn 11008 (random weights).

    Args:
        num_layers: fewer decoder layers than 30, for benchmarks that must fit optimizer state.
    """
    return _real_shape("janus-pro-7b", 4096, 30, 32, 11008, seed, dtype, device, num_layers)


PRESETS: dict[str, Callable[..., JanusBundle]] = {
    "debug": debug,
    "mini": mini,
    "mini-init": mini_init,
    "janus-pro-1b": janus_pro_1b,
    "janus-pro-7b": janus_pro_7b,
}
