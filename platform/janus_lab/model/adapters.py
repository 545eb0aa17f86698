"""LoRA adapters on the generation path, through `peft`.

An adapter is saved in PEFT's own format (`adapter_config.json`, `adapter_model.safetensors`, so
`peft.PeftModel.from_pretrained` reads it) plus `janus_adapter.json`, which names the base it was
trained on: its weights URI (a registry version is pinned to its number), or the preset and seed
of a built-in one. With that file an adapter folder is a model anywhere a model is named
(`jobs/generate.py model=FOLDER`, a registered version, the server's `adapters`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_FILE = "janus_adapter.json"
"""Beside PEFT's files: the base the adapter belongs to."""
PEFT_PREFIX = "base_model.model."
"""What PEFT puts in front of a model's own parameter names in a saved adapter."""
DEFAULT_ADAPTER = "default"


class AdapterError(ValueError):
    """An adapter that cannot be used: unreadable, or made for another base."""


@dataclass(frozen=True)
class AdapterBase:
    """The model an adapter was trained on: what `build_bundle` needs to build it again."""

    preset: str
    weights: str | None
    image_size: int
    init_seed: int

    @property
    def identity(self) -> str:
        """One string per base: the weights URI, `mini`, or a random preset with its size and seed."""
        return base_identity(self.preset, self.weights, self.image_size, self.init_seed)

    def model_config(self):
        from janus_lab.train.config import ModelConfig

        return ModelConfig(preset=self.preset, weights=self.weights, image_size=self.image_size)


def base_identity(preset: str, weights: str | None, image_size: int, init_seed: int) -> str:
    """Names a base so that two names are equal only for the same weights.

    `mini` loads its shipped weights whatever the seed; the other presets without weights are
    random at that seed and size.
    """
    if weights:
        return weights
    if preset == "mini":
        return preset
    return f"{preset}:{image_size}px:seed{init_seed}"


def lora_target_pattern(cfg) -> str:
    """The regex (PEFT matches it against full module names) of the layers `cfg` adapts.

    Only the language model's decoder layers by default: SigLIP has layers named `q_proj` too,
    and image generation never runs it.
    """
    names = "|".join(cfg.target_modules)
    parts = [rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"]
    if cfg.generation_head:
        parts.append(r"model\.generation_head\.(proj_out|vision_head)")
    if cfg.aligner:
        parts.append(r"model\.generation_aligner\.(fc1|hidden_layers\.\d+)")
    return "^(" + "|".join(parts) + ")$"


def peft_config(cfg):
    """The `peft.LoraConfig` of a `janus_lab.train.config.LoraConfig`."""
    import peft

    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
                           lora_dropout=cfg.dropout, target_modules=lora_target_pattern(cfg), bias="none")


def apply_lora(model: torch.nn.Module, cfg, seed: int = 0):
    """Adds adapters to `model` in place and freezes everything else.

    Returns:
        The `peft.PeftModel` around `model` (for saving); `model` itself keeps working as before,
        with the adapters inside its layers.
    """
    import peft

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapters' A matrices start the same on every rank and resume
        wrapped = peft.get_peft_model(model, peft_config(cfg))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters train in float32 over a bfloat16 base
    return wrapped


def adapter_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a full (LoRA-injected) model state, under the names PEFT saves.

    `...q_proj.lora_A.default.weight` becomes `base_model.model....q_proj.lora_A.weight`.
    """
    marker = f".{DEFAULT_ADAPTER}."
    return {PEFT_PREFIX + name.replace(marker, "."): tensor.contiguous()
            for name, tensor in model_state.items() if ".lora_" in name}


def save_adapter(state: dict[str, torch.Tensor], cfg, base: AdapterBase, uri: str | os.PathLike) -> None:
    """Writes an adapter folder (PEFT's files and the base's) to a local folder or an `s3://` prefix.

    Args:
        state: the adapter's tensors as `adapter_state` names them.
        cfg: the `janus_lab.train.config.LoraConfig` it was trained with.
    """
    from safetensors.torch import save_file

    from janus_lab.storage import is_s3_uri, upload_folder

    if is_s3_uri(uri):
        with tempfile.TemporaryDirectory(prefix="janus-adapter-") as tmp:
            save_adapter(state, cfg, base, tmp)
            upload_folder(tmp, str(uri))
        return
    folder = Path(uri)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    peft_config(cfg).save_pretrained(str(folder))
    (folder / BASE_FILE).write_text(json.dumps({"base": asdict(base), "base_identity": base.identity}, indent=2))


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).exists()


def read_base(folder: str | os.PathLike) -> AdapterBase:
    """The base an adapter folder names.

    Raises:
        AdapterError: the folder has no `janus_adapter.json` (a PEFT adapter made elsewhere).
    """
    path = Path(folder) / BASE_FILE
    if not path.exists():
        raise AdapterError(f"{folder} is a PEFT adapter without {BASE_FILE}, so its base is unknown; "
                           f"add one naming the base ({{\"base\": {{\"preset\", \"weights\", \"image_size\", "
                           f"\"init_seed\"}}}})")
    return AdapterBase(**json.loads(path.read_text())["base"])


def attach_adapter(model: torch.nn.Module, folder: str | os.PathLike, name: str = DEFAULT_ADAPTER, wrapped=None):
    """Loads an adapter folder into `model` (or into `wrapped`, the PeftModel already around it).

    Returns:
        The `peft.PeftModel` around `model`; the new adapter is active.
    """
    import peft

    if wrapped is None:
        wrapped = peft.PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
    else:
        wrapped.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        wrapped.set_adapter(name)
    wrapped.eval()
    return wrapped


def load_adapter_bundle(folder: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, merge: bool = False):
    """The base an adapter folder names, built, with the adapter attached (or merged in).

    Args:
        merge: fold the adapter into the base's weights (plain model, no adapter cost per step);
            unmerged computes exactly as the server does with several adapters over one base.
    """
    from janus_lab.model.weights import build_bundle

    base = read_base(folder)
    bundle = build_bundle(base.model_config(), init_seed=base.init_seed, dtype=dtype or torch.float32)
    bundle.model.to(device)
    wrapped = attach_adapter(bundle.model, folder)
    if merge:
        bundle.model = wrapped.merge_and_unload()
    bundle.preset = f"adapter:{folder} on {base.identity}"
    return bundle


def merged_state(model_state: dict[str, torch.Tensor], model: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """Folds the adapters of a full (LoRA-injected) model state into plain weights.

    Args:
        model_state: what `get_model_state_dict` of the adapted model returns (base + adapters).
        model: a model of the same architecture without adapters (any device, meta included).
        cfg: the `LoraConfig` the adapters were made with.

    Returns:
        The state of `model`'s own parameters, adapters merged: W + (alpha / r) B A.
    """
    import peft

    with torch.device("meta"):
        fresh = type(model)(model.config)
    wrapped = peft.get_peft_model(fresh, peft_config(cfg))
    # Merging adds into the base weights in place: copies, so the caller's tensors (on CPU, the
    # live model's own) stay as they are.
    copies = {name: tensor.detach().clone() for name, tensor in model_state.items()}
    wrapped.base_model.model.load_state_dict(copies, assign=True, strict=True)
    return wrapped.merge_and_unload().state_dict()
