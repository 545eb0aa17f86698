"""Loading and saving Janus checkpoints in the Hugging Face layout, safetensors only.

Pickle-based checkpoints (`.bin`, `.pt`, ...) can run arbitrary code when loaded, so they are
refused; `janus_lab.model.convert` turns a trusted one into safetensors once.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor, JanusVQVAE

from janus_lab.model.builders import PRESETS, JanusBundle, freeze_vq_tokenizer
from janus_lab.storage import download_prefix, is_s3_uri, upload_folder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PickleCheckpointError(ValueError):
    """A checkpoint folder holds only pickle weights."""


def resolve_checkpoint(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns a local folder for a checkpoint given as a local path or an `s3://` prefix.

    Raises:
        FileNotFoundError: the folder does not exist or has no config.json.
        ValueError: the folder is in DeepSeek's original layout (convert it first).
        PickleCheckpointError: the weights are pickle files only.
    """
    folder = download_prefix(str(uri), cache_dir) if is_s3_uri(uri) else Path(uri)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {uri} does not exist")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{uri} has no config.json; expected a Hugging Face format checkpoint folder")
    if json.loads((folder / "config.json").read_text()).get("model_type") == "multi_modality":
        # transformers would build a default JanusConfig from it and leave every weight at random init.
        raise ValueError(f"{uri} is a checkpoint in DeepSeek's original layout (model_type multi_modality, as "
                         "deepseek-ai/Janus-Pro-* and Janus-4o-7B ship); convert it once with "
                         "`python -m janus_lab.model.convert SRC DST` and load DST")
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safetensors:
        if pickles:
            raise PickleCheckpointError(
                f"{uri} holds pickle weights only ({', '.join(sorted(pickles)[:3])}); they can execute code "
                "when loaded, so janus-lab reads safetensors only. Convert a trusted checkpoint once with "
                "`python -m janus_lab.model.convert --allow-pickle SRC DST`."
            )
        raise FileNotFoundError(f"{uri} has no *.safetensors weights")
    return folder


def load_pretrained(uri: str | os.PathLike, dtype: torch.dtype | None = None,
                    cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> JanusBundle:
    """Loads a Janus model and its processor from a local folder or an `s3://` prefix.

    Args:
        uri: checkpoint folder in the Hugging Face layout.
        dtype: parameter dtype (default: as saved).
        cache_dir: where `s3://` checkpoints are downloaded.
        device: where the weights go.
    """
    folder = resolve_checkpoint(uri, cache_dir)
    model = JanusForConditionalGeneration.from_pretrained(folder, use_safetensors=True, dtype=dtype or "auto")
    model = model.to(device)
    processor = JanusProcessor.from_pretrained(folder)
    freeze_vq_tokenizer(model)
    return JanusBundle(model=model, processor=processor, preset=f"pretrained:{uri}")


VQ_PREFIX = "model.vqmodel."


def load_vq_tokenizer(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu") -> tuple[JanusVQVAE, JanusProcessor, JanusConfig]:
    """Loads only the VQ tokenizer of a checkpoint (float32, frozen), with its processor and config.

    Reads the `model.vqmodel.*` tensors alone out of the safetensors files, so encoding images
    costs 0.07 B parameters of memory instead of the whole model (30 GB in float32 for 7B).

    Raises:
        FileNotFoundError, PickleCheckpointError: as `resolve_checkpoint`.
        ValueError: the checkpoint's VQ tensors do not match its config.
    """
    from safetensors import safe_open

    folder = resolve_checkpoint(uri, cache_dir)
    config = JanusConfig.from_pretrained(folder)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():
                if key.startswith(VQ_PREFIX):
                    state[key[len(VQ_PREFIX):]] = weights.get_tensor(key).float()
    vq = JanusVQVAE(config.vq_config)
    missing, unexpected = vq.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{uri}: the VQ tokenizer's tensors do not match its config "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    vq = vq.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return vq, JanusProcessor.from_pretrained(folder), config


def save_pretrained(bundle: JanusBundle, uri: str | os.PathLike) -> None:
    """Saves model (safetensors) and processor to a local folder or an `s3://` prefix."""
    if is_s3_uri(uri):
        with tempfile.TemporaryDirectory(prefix="janus-export-") as tmp:
            save_pretrained(bundle, tmp)
            upload_folder(tmp, str(uri))
        return
    folder = Path(uri)
    folder.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(folder, safe_serialization=True)
    bundle.processor.save_pretrained(folder)


def build_bundle(model, init_seed: int, dtype: torch.dtype = torch.float32) -> JanusBundle:
    """The model a `ModelConfig` names: weights from a path, or a preset at seeded random init.

    Ingest and fine-tuning both build through here, so a random-init debug model gets the same
    VQ tokenizer in both when they use the same seed.

    Args:
        model: a `janus_lab.train.config.ModelConfig`; `weights` may be a folder, an `s3://` prefix or
            a registry version (`models:/name/version`).
        init_seed: seed of the random init (ignored when weights are given).
        dtype: parameter dtype, whatever the checkpoint holds. Training keeps float32 master
            weights: the released checkpoints are bfloat16, and AdamW updates at lr 5e-6 are
            mostly below bfloat16's resolution, so they would be lost; FSDP's mixed-precision
            policy still computes in bfloat16 on GPUs.
    """
    if model.weights:
        weights = model.weights
        if weights.startswith("models:/"):  # a registered version: downloaded through the registry
            from janus_lab.generation.loading import resolve_model_uri

            weights = resolve_model_uri(weights)
        return load_pretrained(weights, dtype=dtype)
    kwargs = {"image_size": model.image_size} if model.preset == "debug" else {}
    return PRESETS[model.preset](seed=init_seed, dtype=dtype, **kwargs)
