"""CLIP scores of generated images: CLIP-T (prompt vs image) and CLIP-I (edit input vs output).

The CLIP model comes from a configured folder in the Hugging Face layout (local or `s3://`),
e.g. a copy of `openai/clip-vit-large-patch14`. `debug` builds a tiny random CLIP instead, and
`save_random_clip` writes that one to a folder for tests; a random CLIP is marked in its config,
and every score made with it is labelled as coming from a random test model, because its
numbers say nothing about image quality.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

DEBUG_CLIP = "debug"
RANDOM_CLIP_MARK = "janus_random_test_clip"
"""Attribute set to true in the config of a CLIP built by `build_random_clip`."""
RANDOM_CLIP_NOTE = "scores from a RANDOM TEST CLIP (tiny, untrained): they check the pipeline, not image quality"


class ClipScorer:
    """Embeds images and texts with one CLIP model and compares them by cosine similarity.

    Args:
        model: a `transformers.CLIPModel`.
        tokenizer: its tokenizer.
        image_processor: its image processor.
        source: where the model came from (shown with the scores).
    """

    def __init__(self, model, tokenizer, image_processor, source: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.device = next(model.parameters()).device
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)

    @property
    def is_random_test_model(self) -> bool:
        """True for a CLIP made by `build_random_clip`: its scores carry no meaning."""
        return bool(getattr(self.model.config, RANDOM_CLIP_MARK, False))

    @property
    def label(self) -> str:
        """How outputs name the scores' origin."""
        return f"{RANDOM_CLIP_NOTE} ({self.source})" if self.is_random_test_model else f"CLIP {self.source}"

    @classmethod
    def load(cls, uri: str, device: str | torch.device = "cpu") -> "ClipScorer":
        """Loads a CLIP folder (local or `s3://`), or builds the random test CLIP for `debug`.

        Raises:
            FileNotFoundError: the folder does not exist or holds no CLIP config.
        """
        from transformers import AutoTokenizer, CLIPModel

        if uri == DEBUG_CLIP:
            model, tokenizer, image_processor = build_random_clip()
            return cls(model.to(device), tokenizer, image_processor, source="debug (built in memory)")
        folder = _local_folder(uri)
        model = CLIPModel.from_pretrained(folder, use_safetensors=True).to(device)
        return cls(model, AutoTokenizer.from_pretrained(folder), _image_processor(folder), source=uri)

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-length image embeddings."""
        pixels = self.image_processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return _unit(getattr(features, "pooler_output", features))

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-length text embeddings (texts longer than CLIP's context are truncated)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        return _unit(getattr(features, "pooler_output", features))

    def clip_t(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each image with its text (CLIP-T)."""
        if not images:
            return []
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(dim=-1).tolist()

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        """Cosine similarity of each image with its reference image (CLIP-I: edit input vs output)."""
        if not images:
            return []
        return (self.image_embeddings(images) * self.image_embeddings(references)).sum(dim=-1).tolist()


def build_random_clip(seed: int = 0, image_size: int = 32):
    """A tiny random CLIP (2 layers, width 32) with a locally trained tokenizer; marked as random.

    Returns:
        (model, tokenizer, image processor).
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from janus_lab.model.tokenizer import EOS_TOKEN, build_debug_tokenizer

    tokenizer = build_debug_tokenizer(vocab_size=512)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    # CLIP's text tower pools the hidden state at the end-of-text token, so every text ends in one.
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"$A {EOS_TOKEN}",
                                                                    special_tokens=[(EOS_TOKEN, eos)])
    tokenizer.padding_side = "right"
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "eos_token_id": eos,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id},
        vision_config={**small, "image_size": image_size, "patch_size": 8},
        projection_dim=16,
    )
    setattr(config, RANDOM_CLIP_MARK, True)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, image_processor


def save_random_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the random test CLIP to a folder (safetensors), as tests point sweeps at it."""
    model, tokenizer, image_processor = build_random_clip(seed)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def check_clip_source(uri: str) -> None:
    """Fails fast (before any trial) when a CLIP folder is missing.

    Raises:
        FileNotFoundError: the folder does not exist or has no config.json.
    """
    if uri != DEBUG_CLIP:
        _local_folder(uri)


def is_random_clip(uri: str) -> bool:
    """Whether a CLIP source is the random test CLIP (`debug`, or a folder `save_random_clip` wrote)."""
    import json

    if uri == DEBUG_CLIP:
        return True
    return bool(json.loads((_local_folder(uri) / "config.json").read_text()).get(RANDOM_CLIP_MARK, False))


def _local_folder(uri: str) -> Path:
    from janus_lab.storage import download_prefix, is_s3_uri

    folder = download_prefix(uri) if is_s3_uri(uri) else Path(uri)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"CLIP model {uri} does not exist or has no config.json; point clip_model at a "
                                "Hugging Face CLIP folder (e.g. a copy of openai/clip-vit-large-patch14)")
    return folder


def _image_processor(folder: Path):
    # The PIL processor: torchvision (which the fast one needs) is not a dependency.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(folder)


def _unit(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)
