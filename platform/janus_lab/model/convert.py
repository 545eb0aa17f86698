"""Convert checkpoints from the original DeepSeek Janus layout to the transformers layout.

Janus-Pro and Janus-4o-7B ship in the layout of DeepSeek's `MultiModalityCausalLM`
(`language_model.model.*`, `vision_model.vision_tower.*` from timm's SigLIP with fused qkv,
`gen_vision_model.*` from the LlamaGen VQ tokenizer, `aligner`, `gen_aligner`, `gen_head`,
`gen_embed`) with a `multi_modality` config.json. transformers' `JanusForConditionalGeneration`
names the same tensors differently; the renaming rules below go both ways, so the round trip
is testable.

    python -m janus_lab.model.convert SRC_DIR DST_DIR [--allow-pickle]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusProcessor,
)

from janus_lab.model.builders import janus_config
from janus_lab.model.tokenizer import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, PAD_TOKEN, SpecialTokenIds, build_processor
from janus_lab.patches import num_image_tokens

# (DeepSeek pattern, transformers pattern). `{n}` stands for a layer index. Order matters: the
# first rule whose pattern matches a key renames it. Fused qkv is split separately.
_RENAMES: list[tuple[str, str]] = [
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_model.vision_tower.patch_embed.proj.", "model.vision_model.embeddings.patch_embedding."),
    ("vision_model.vision_tower.pos_embed", "model.vision_model.embeddings.position_embedding.weight"),
    ("vision_model.vision_tower.norm.", "model.vision_model.post_layernorm."),
    ("vision_model.vision_tower.blocks.{n}.norm1.", "model.vision_model.encoder.layers.{n}.layer_norm1."),
    ("vision_model.vision_tower.blocks.{n}.norm2.", "model.vision_model.encoder.layers.{n}.layer_norm2."),
    ("vision_model.vision_tower.blocks.{n}.attn.proj.", "model.vision_model.encoder.layers.{n}.self_attn.projection_layer."),
    ("vision_model.vision_tower.blocks.{n}.mlp.", "model.vision_model.encoder.layers.{n}.mlp."),
    ("aligner.layers.0.", "model.aligner.fc1."),
    ("aligner.layers.2.", "model.aligner.hidden_layers.0."),
    ("gen_aligner.layers.0.", "model.generation_aligner.fc1."),
    ("gen_aligner.layers.2.", "model.generation_aligner.hidden_layers.0."),
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.vision_head.", "model.generation_head.vision_head."),
    ("gen_embed.", "model.generation_embeddings."),
    ("gen_vision_model.", "model.vqmodel."),
]
# Inside the VQ tokenizer (after the prefix rule above).
_VQ_RENAMES: list[tuple[str, str]] = [
    (".encoder.conv_blocks.", ".encoder.down."),
    (".decoder.conv_blocks.", ".decoder.up."),
    (".res.", ".block."),
    (".mid.0.", ".mid.block_1."),
    (".mid.1.", ".mid.attn_1."),
    (".mid.2.", ".mid.block_2."),
]
# Tensors the transformers model has no use for (older transformers also saved RoPE's inverse
# frequencies, which are recomputed from the config).
_DROPPED = (re.compile(r"^vision_model\.vision_tower\.attn_pool\."), re.compile(r"\.quantize\.codebook_used$"),
            re.compile(r"\.rotary_emb\.inv_freq$"))
_QKV = re.compile(r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_QKV_HF = re.compile(r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for source, target in rules:
        match = _pattern(source).match(key)
        if match:
            replacement = target.replace("{n}", match.groupdict().get("n") or "")
            return replacement + key[match.end():]
    return None


def hf_key_from_deepseek(key: str) -> str | None:
    """The transformers name of a DeepSeek-layout tensor (None: dropped).

    Raises:
        KeyError: the key follows no known rule (an unexpected checkpoint).
    """
    if any(p.search(key) for p in _DROPPED):
        return None
    renamed = _rename(key, _RENAMES)
    if renamed is None:
        raise KeyError(f"no conversion rule for DeepSeek tensor {key!r}")
    if renamed.startswith("model.vqmodel."):
        for source, target in _VQ_RENAMES:
            renamed = renamed.replace(source, target)
    return renamed


def deepseek_key_from_hf(key: str) -> str:
    """The DeepSeek name of a transformers-layout tensor (the inverse of `hf_key_from_deepseek`)."""
    renamed = _rename(key, [(target, source) for source, target in _RENAMES])
    if renamed is None:
        raise KeyError(f"no conversion rule for transformers tensor {key!r}")
    if renamed.startswith("gen_vision_model."):
        for source, target in _VQ_RENAMES:
            renamed = renamed.replace(target, source)
    return renamed


def convert_state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a DeepSeek-layout state dict to the transformers layout.

    Fused SigLIP qkv projections are split into q/k/v and the (1, N, C) position embedding
    loses its batch axis.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        fused = _QKV.match(key)
        if fused:
            layer, kind = fused.groups()
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"model.vision_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        new_key = hf_key_from_deepseek(key)
        if new_key is None:
            continue
        if new_key.endswith("position_embedding.weight") and tensor.dim() == 3:
            tensor = tensor.squeeze(0)
        out[new_key] = tensor
    return out


def convert_state_dict_to_deepseek(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `convert_state_dict_to_hf` (for exports to the original tooling, and tests)."""
    out: dict[str, torch.Tensor] = {}
    split: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        qkv = _QKV_HF.match(key)
        if qkv:
            layer, name, kind = qkv.groups()
            split.setdefault((layer, kind), {})[name] = tensor
            continue
        new_key = deepseek_key_from_hf(key)
        if new_key == "vision_model.vision_tower.pos_embed":
            tensor = tensor.unsqueeze(0)
        out[new_key] = tensor
    for (layer, kind), parts in split.items():
        out[f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


# SigLIP-L/16 at 384 px: what `siglip_large_patch16_384` in a DeepSeek config means.
_SIGLIP_LARGE = {"width": 1024, "layers": 24, "heads": 16}

# DeepSeek's code builds its language model from `LlamaConfig(**language_config)`, so a key that
# config.json leaves out means LlamaConfig's default. Janus-Pro-7B relies on it: its
# language_config names only layers, vocab and positions. These are those defaults, the same in
# every transformers release since Llama was added.
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "max_position_embeddings": 2048}
# Also LlamaConfig defaults, and the only values `janus_config` builds: a config that sets one
# otherwise is refused rather than converted into a model that computes something else.
_LLAMA_FIXED = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None}


def _require(config: dict, section: str, key: str, expected) -> None:
    value = config.get(section, {}).get("params", {}).get(key, expected)
    if value != expected:
        raise ValueError(f"{section}.params.{key}={value!r}; janus-lab converts {expected!r} only")


def hf_config_from_deepseek(config: dict, special: SpecialTokenIds) -> JanusConfig:
    """Builds a `JanusConfig` from a DeepSeek `multi_modality` config.json.

    Language-model keys the file leaves out take LlamaConfig's defaults, as in DeepSeek's code.
    Vision width/layers/heads default to SigLIP-L; the optional `width`/`layers`/`heads` and
    `base_channels` params are janus-lab's own, for small test models.

    Raises:
        ValueError: not a DeepSeek config, or one that describes another architecture.
    """
    if config.get("model_type") != "multi_modality":
        raise ValueError(f"expected a DeepSeek multi_modality config, got model_type={config.get('model_type')!r}")
    lang = {**_LLAMA_DEFAULTS, **config["language_config"]}
    for key, expected in _LLAMA_FIXED.items():
        if lang.get(key, expected) != expected:
            raise ValueError(f"language_config.{key}={lang[key]!r}; janus-lab converts {expected!r} only")
    heads = lang["num_attention_heads"]
    if lang.get("num_key_value_heads", heads) != heads:
        raise ValueError(f"language_config.num_key_value_heads={lang['num_key_value_heads']} differs from "
                         f"num_attention_heads={heads}; janus-lab converts multi-head attention only")
    hidden = lang["hidden_size"]
    vision = {**_SIGLIP_LARGE, **config["vision_config"]["params"]}
    gen_vision = config["gen_vision_config"]["params"]
    for section, key, expected in (
        ("vision_config", "model_name", "siglip_large_patch16_384"), ("vision_config", "select_layer", -1),
        ("gen_vision_config", "n_embed", 8), ("gen_vision_config", "image_token_size", 16384),
        # The heads and aligners are as wide as the language model: a check on the defaults above.
        ("aligner_config", "n_embed", hidden), ("gen_aligner_config", "n_embed", hidden),
        ("gen_head_config", "n_embed", hidden), ("gen_head_config", "image_token_embed", hidden),
    ):
        _require(config, section, key, expected)
    return janus_config(
        vocab_size=lang["vocab_size"], hidden_size=hidden, num_layers=lang["num_hidden_layers"],
        num_heads=heads, intermediate_size=lang["intermediate_size"],
        image_size=vision.get("image_size", 384), vision_hidden=vision["width"], vision_layers=vision["layers"],
        vision_heads=vision["heads"], vq_base_channels=gen_vision.get("base_channels", 128), special_ids=special,
        max_positions=lang["max_position_embeddings"],
    )


def deepseek_config_from_hf(config: JanusConfig) -> dict:
    """A DeepSeek `multi_modality` config.json describing a transformers Janus config."""
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    hidden = text.hidden_size
    return {
        "model_type": "multi_modality",
        "language_config": {
            "model_type": "llama", "vocab_size": text.vocab_size, "hidden_size": hidden,
            "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "max_position_embeddings": text.max_position_embeddings,
        },
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
            "image_size": vision.image_size, "model_name": "siglip_large_patch16_384", "select_feature": "same",
            "select_layer": -1, "width": vision.hidden_size, "layers": vision.num_hidden_layers,
            "heads": vision.num_attention_heads}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {
            "depth": 2, "input_dim": vision.hidden_size, "n_embed": hidden, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
            "image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim, "base_channels": vq.base_channels}},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {
            "depth": 2, "input_dim": vq.embed_dim, "n_embed": hidden, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
            "image_token_embed": hidden, "image_token_size": vq.num_embeddings, "n_embed": hidden}},
    }


def _read_weights(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if files:
        for path in files:
            state.update(load_file(path))
        return state
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if not pickles:
        raise FileNotFoundError(f"{folder} has neither *.safetensors nor pytorch_model*.bin weights")
    if not allow_pickle:
        raise ValueError(
            f"{folder} holds pickle weights ({pickles[0].name}); pass --allow-pickle only for a checkpoint you "
            "trust (it is read with torch's restricted weights-only unpickler) to convert it to safetensors."
        )
    for path in pickles:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def model_from_deepseek(config: dict, state: dict[str, torch.Tensor],
                        special: SpecialTokenIds) -> JanusForConditionalGeneration:
    """The transformers model holding a DeepSeek-layout checkpoint's tensors (assigned, not copied).

    Args:
        config: the DeepSeek `multi_modality` config.json.
        state: its state dict, DeepSeek names (meta tensors work: nothing is computed).
        special: the tokenizer's special ids (they go into the text config).

    Raises:
        ValueError: the tensors do not match the architecture the config describes.
    """
    hf_config = hf_config_from_deepseek(config, special)
    state = convert_state_dict_to_hf(state)
    with torch.device("meta"):
        model = JanusForConditionalGeneration(hf_config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"converted weights do not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, assign=True, strict=True)
    return model


def convert_deepseek_checkpoint(src: str | Path, dst: str | Path, allow_pickle: bool = False) -> Path:
    """Converts a DeepSeek-layout Janus folder into a transformers-layout folder (safetensors).

    Args:
        src: folder with config.json (multi_modality), weights and tokenizer files.
        dst: output folder; written with `save_pretrained`, loadable by `load_pretrained`.
        allow_pickle: read `pytorch_model*.bin` with the weights-only unpickler.

    Returns:
        The output folder.
    """
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(
        src, extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
    )
    # DeepSeek's processor pads with PAD_TOKEN whatever the tokenizer's pad_token says; the
    # converted tokenizer says so itself, so nothing downstream can pick another pad.
    tokenizer.pad_token = PAD_TOKEN
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    model = model_from_deepseek(config, _read_weights(src, allow_pickle), special)
    image_size = model.config.vision_config.image_size
    processor: JanusProcessor = build_processor(tokenizer, image_size, num_image_tokens(image_size))
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    processor.save_pretrained(dst)
    return dst


def write_deepseek_checkpoint(model: JanusForConditionalGeneration, tokenizer, dst: str | Path) -> Path:
    """Writes a transformers Janus model in the DeepSeek layout (config.json, safetensors, tokenizer)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(deepseek_config_from_hf(model.config), indent=2))
    state = {k: v.contiguous() for k, v in convert_state_dict_to_deepseek(model.state_dict()).items()}
    save_file(state, dst / "model.safetensors")
    tokenizer.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="DeepSeek-layout checkpoint folder")
    parser.add_argument("dst", help="output folder (transformers layout, safetensors)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pytorch_model*.bin with torch's weights-only unpickler (trusted sources only)")
    args = parser.parse_args(argv)
    out = convert_deepseek_checkpoint(args.src, args.dst, allow_pickle=args.allow_pickle)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
