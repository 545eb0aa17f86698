"""The checkpoint layouts users hold, from config.json files the project did not write.

- DeepSeek's original layout: deepseek-ai/Janus-Pro-1B and -7B, and FreedomIntelligence's
  Janus-4o-7B (a Janus-Pro-7B fine-tune saved by DeepSeek's code). Converted once with
  `python -m janus_lab.model.convert`; the loader refuses them unconverted.
- The transformers layout (deepseek-community/Janus-Pro-*): loaded as it is.

The tensor names below are written from DeepSeek's modules (janus/models in deepseek-ai/Janus:
LlamaForCausalLM, timm's SigLIP ViT, the LlamaGen VQ-16, the MLP aligners and the generation
head), not from the converter's renaming rules, so a wrong rule fails here. Full-size checks
run on the meta device; tests that write files use the same names at small sizes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import JanusConfig, JanusForConditionalGeneration

from janus_lab.model import janus_pro_1b, janus_pro_7b
from janus_lab.model.convert import convert_deepseek_checkpoint, hf_config_from_deepseek, model_from_deepseek
from janus_lab.model.tokenizer import PAD_TOKEN, SpecialTokenIds, build_debug_tokenizer, build_processor
from janus_lab.model.weights import load_pretrained


def _deepseek_config(hidden: int, language_config: dict) -> dict:
    """A released Janus-Pro config.json; the two sizes differ in the language model's width."""
    return {
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {
            "depth": 2, "input_dim": 1024, "n_embed": hidden, "projector_type": "mlp_gelu"}},
        "architectures": ["MultiModalityCausalLM"],
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {
            "depth": 2, "input_dim": 8, "n_embed": hidden, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
            "image_token_embed": hidden, "image_token_size": 16384, "n_embed": hidden}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
            "image_token_size": 16384, "n_embed": 8}},
        "language_config": language_config,
        "model_type": "multi_modality",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
            "image_size": 384, "model_name": "siglip_large_patch16_384", "select_feature": "same",
            "select_layer": -1}},
    }


# language_config exactly as released: the 1B spells out its sizes, the 7B leaves hidden size,
# intermediate size and heads to LlamaConfig's defaults (4096, 11008, 32).
JANUS_PRO_1B = _deepseek_config(2048, {
    "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 16384, "model_type": "llama",
    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "torch_dtype": "bfloat16",
    "vocab_size": 102400})
JANUS_PRO_7B = _deepseek_config(4096, {
    "max_position_embeddings": 16384, "model_type": "llama", "num_hidden_layers": 30, "torch_dtype": "bfloat16",
    "vocab_size": 102400})
# A 7B config whose language_config spells out every LlamaConfig key, as a later `save_pretrained`
# may write it (Janus-4o-7B was saved by the fine-tuning script, not by DeepSeek).
JANUS_PRO_7B_EXPLICIT = _deepseek_config(4096, {
    **JANUS_PRO_7B["language_config"], "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
    "num_key_value_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "rope_scaling": None, "attention_bias": False, "pretraining_tp": 1, "tie_word_embeddings": False})

# (hidden, layers, heads, ffn) of the released language models.
RELEASED = {"1b": (2048, 24, 16, 5632), "7b": (4096, 30, 32, 11008)}
CONFIGS = {"1b": JANUS_PRO_1B, "7b": JANUS_PRO_7B, "7b-explicit": JANUS_PRO_7B_EXPLICIT}


def deepseek_state_dict(*, vocab: int, hidden: int, layers: int, ffn: int, vision_width: int = 1024,
                        vision_layers: int = 24, image_size: int = 384, vq_channels: int = 128,
                        device: str = "meta", seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a DeepSeek-layout Janus-Pro checkpoint, by name and shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(prefix: str, out: int, inp: int, bias: bool = True) -> None:
        shapes[f"{prefix}.weight"] = (out, inp)
        if bias:
            shapes[f"{prefix}.bias"] = (out,)

    def conv(prefix: str, out: int, inp: int, kernel: int) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (out, inp, kernel, kernel), (out,)

    def norm(prefix: str, channels: int) -> None:  # LayerNorm and GroupNorm: weight and bias
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (channels,), (channels,)

    # LlamaForCausalLM
    lm = "language_model.model"
    shapes[f"{lm}.embed_tokens.weight"] = (vocab, hidden)
    for i in range(layers):
        for proj in "qkvo":
            linear(f"{lm}.layers.{i}.self_attn.{proj}_proj", hidden, hidden, bias=False)
        linear(f"{lm}.layers.{i}.mlp.gate_proj", ffn, hidden, bias=False)
        linear(f"{lm}.layers.{i}.mlp.up_proj", ffn, hidden, bias=False)
        linear(f"{lm}.layers.{i}.mlp.down_proj", hidden, ffn, bias=False)
        shapes[f"{lm}.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"{lm}.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes[f"{lm}.norm.weight"] = (hidden,)
    shapes["language_model.lm_head.weight"] = (vocab, hidden)

    # timm VisionTransformer (SigLIP), fused qkv, with the attention-pool head Janus never uses
    vit, w = "vision_model.vision_tower", vision_width
    conv(f"{vit}.patch_embed.proj", w, 3, 16)
    shapes[f"{vit}.pos_embed"] = (1, (image_size // 16) ** 2, w)
    for i in range(vision_layers):
        norm(f"{vit}.blocks.{i}.norm1", w)
        linear(f"{vit}.blocks.{i}.attn.qkv", 3 * w, w)
        linear(f"{vit}.blocks.{i}.attn.proj", w, w)
        norm(f"{vit}.blocks.{i}.norm2", w)
        linear(f"{vit}.blocks.{i}.mlp.fc1", 4 * w, w)
        linear(f"{vit}.blocks.{i}.mlp.fc2", w, 4 * w)
    norm(f"{vit}.norm", w)
    shapes[f"{vit}.attn_pool.latent"] = (1, 1, w)
    linear(f"{vit}.attn_pool.q", w, w)
    linear(f"{vit}.attn_pool.kv", 2 * w, w)
    linear(f"{vit}.attn_pool.proj", w, w)
    norm(f"{vit}.attn_pool.norm", w)
    linear(f"{vit}.attn_pool.mlp.fc1", 4 * w, w)
    linear(f"{vit}.attn_pool.mlp.fc2", w, 4 * w)

    # MlpProjector (Linear, GELU, Linear) aligners, the generation head and embedding
    linear("aligner.layers.0", hidden, w)
    linear("aligner.layers.2", hidden, hidden)
    linear("gen_aligner.layers.0", hidden, 8)
    linear("gen_aligner.layers.2", hidden, hidden)
    linear("gen_head.output_mlp_projector", hidden, hidden)
    linear("gen_head.vision_head", 16384, hidden)
    shapes["gen_embed.weight"] = (16384, 8)

    # LlamaGen VQ-16: channel multipliers (1, 1, 2, 2, 4), 2 res blocks down / 3 up, z 256
    mult, z = (1, 1, 2, 2, 4), 256

    def res(prefix: str, cin: int, cout: int) -> None:
        norm(f"{prefix}.norm1", cin)
        conv(f"{prefix}.conv1", cout, cin, 3)
        norm(f"{prefix}.norm2", cout)
        conv(f"{prefix}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{prefix}.nin_shortcut", cout, cin, 1)

    def attn(prefix: str, c: int) -> None:
        norm(f"{prefix}.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.{name}", c, c, 1)

    def mid(prefix: str, c: int) -> None:
        res(f"{prefix}.mid.0", c, c)
        attn(f"{prefix}.mid.1", c)
        res(f"{prefix}.mid.2", c, c)

    enc, dec = "gen_vision_model.encoder", "gen_vision_model.decoder"
    conv(f"{enc}.conv_in", vq_channels, 3, 3)
    c = vq_channels
    for level, m in enumerate(mult):
        for j in range(2):
            res(f"{enc}.conv_blocks.{level}.res.{j}", c, vq_channels * m)
            c = vq_channels * m
            if level == len(mult) - 1:
                attn(f"{enc}.conv_blocks.{level}.attn.{j}", c)
        if level != len(mult) - 1:
            conv(f"{enc}.conv_blocks.{level}.downsample.conv", c, c, 3)
    mid(enc, c)
    norm(f"{enc}.norm_out", c)
    conv(f"{enc}.conv_out", z, c, 3)
    conv(f"{dec}.conv_in", c, z, 3)
    mid(dec, c)
    for block, level in enumerate(reversed(range(len(mult)))):
        for j in range(3):
            res(f"{dec}.conv_blocks.{block}.res.{j}", c, vq_channels * mult[level])
            c = vq_channels * mult[level]
            if level == len(mult) - 1:
                attn(f"{dec}.conv_blocks.{block}.attn.{j}", c)
        if level != 0:
            conv(f"{dec}.conv_blocks.{block}.upsample.conv", c, c, 3)
    norm(f"{dec}.norm_out", c)
    conv(f"{dec}.conv_out", 3, c, 3)
    shapes["gen_vision_model.quantize.embedding.weight"] = (16384, 8)
    shapes["gen_vision_model.quantize.codebook_used"] = (65536,)
    conv("gen_vision_model.quant_conv", 8, z, 1)
    conv("gen_vision_model.post_quant_conv", z, 8, 1)

    if device == "meta":
        return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def special() -> SpecialTokenIds:
    return SpecialTokenIds.from_tokenizer(build_debug_tokenizer())


@pytest.mark.parametrize("name", CONFIGS)
def test_released_configs_describe_the_released_models(name, special):
    hidden, layers, heads, ffn = RELEASED[name[:2]]
    text = hf_config_from_deepseek(CONFIGS[name], special).text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        hidden, layers, heads, ffn)
    assert (text.num_key_value_heads, text.vocab_size, text.max_position_embeddings) == (heads, 102400, 16384)
    # The same architecture as the project's real-shape presets, tensor for tensor.
    preset = (janus_pro_1b if name == "1b" else janus_pro_7b)(device="meta").model
    with torch.device("meta"):
        converted = JanusForConditionalGeneration(hf_config_from_deepseek(CONFIGS[name], special))
    assert {k: v.shape for k, v in converted.state_dict().items()} == {
        k: v.shape for k, v in preset.state_dict().items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_released_checkpoints_convert_at_full_size(name, special):
    hidden, layers, _, ffn = RELEASED[name[:2]]
    state = deepseek_state_dict(vocab=102400, hidden=hidden, layers=layers, ffn=ffn)
    # The published training script's decay filter looked for "LayerNorm.weight": no such name.
    assert not [key for key in state if "LayerNorm" in key]
    model = model_from_deepseek(CONFIGS[name], state, special)  # strict: every tensor placed, shapes checked
    assert model.model.vision_model.encoder.layers[23].self_attn.q_proj.weight.shape == (1024, 1024)
    assert model.model.vision_model.embeddings.position_embedding.weight.shape == (576, 1024)
    assert model.model.generation_head.vision_head.weight.shape == (16384, hidden)
    assert model.lm_head.weight.shape == (102400, hidden) and not model.config.tie_word_embeddings


def _shrunk(config: dict) -> dict:
    """The same config.json at test size: only sizes change, every key the release has stays."""
    config = copy.deepcopy(config)
    config["language_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     num_key_value_heads=4, num_hidden_layers=2, vocab_size=1024)
    # width/layers/heads/base_channels are janus-lab's own params for small SigLIP and VQ models.
    config["vision_config"]["params"].update(image_size=64, width=32, layers=1, heads=2)
    config["gen_vision_config"]["params"]["base_channels"] = 32
    config["aligner_config"]["params"].update(input_dim=32, n_embed=64)
    config["gen_aligner_config"]["params"]["n_embed"] = 64
    config["gen_head_config"]["params"].update(image_token_embed=64, n_embed=64)
    return config


def _write_deepseek_folder(folder, config: dict, tokenizer) -> dict[str, torch.Tensor]:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = deepseek_state_dict(vocab=1024, hidden=64, layers=2, ffn=128, vision_width=32, vision_layers=1,
                                image_size=64, vq_channels=32, device="cpu")
    # Sharded like the released weights: language model in one file, the rest in another.
    language = {k: v for k, v in state.items() if k.startswith("language_model.")}
    save_file(language, folder / "model-00001-of-00002.safetensors")
    save_file({k: v for k, v in state.items() if k not in language}, folder / "model-00002-of-00002.safetensors")
    tokenizer.save_pretrained(folder)
    return state


@pytest.mark.parametrize("pad_token", [None, "eos"], ids=["pad-unset", "pad-is-eos"])
def test_deepseek_folder_converts_and_loads(tmp_path, pad_token):
    tokenizer = build_debug_tokenizer()
    pad_id = tokenizer.get_vocab()[PAD_TOKEN]
    # DeepSeek's processor never reads tokenizer.pad_token, so a DeepSeek folder may leave it
    # unset or name another token; the converter pads with <｜▁pad▁｜> either way.
    tokenizer.pad_token = tokenizer.eos_token if pad_token == "eos" else None
    src = tmp_path / "Janus-Pro-7B"
    state = _write_deepseek_folder(src, _shrunk(JANUS_PRO_7B), tokenizer)
    with pytest.raises(ValueError, match=r"DeepSeek's original layout .*python -m janus_lab.model.convert"):
        load_pretrained(src)

    bundle = load_pretrained(convert_deepseek_checkpoint(src, tmp_path / "converted"))
    assert bundle.processor.tokenizer.pad_token == PAD_TOKEN
    assert bundle.special_ids.pad == pad_id == bundle.model.config.text_config.pad_token_id
    weights = bundle.model.state_dict()
    lm, vit = "language_model.model", "vision_model.vision_tower"
    assert torch.equal(weights["model.language_model.embed_tokens.weight"], state[f"{lm}.embed_tokens.weight"])
    assert torch.equal(weights["lm_head.weight"], state["language_model.lm_head.weight"])
    q, k, v = state[f"{vit}.blocks.0.attn.qkv.weight"].chunk(3)
    assert torch.equal(weights["model.vision_model.encoder.layers.0.self_attn.k_proj.weight"], k)
    assert torch.equal(weights["model.vision_model.embeddings.position_embedding.weight"],
                       state[f"{vit}.pos_embed"][0])
    assert torch.equal(weights["model.vqmodel.decoder.up.0.attn.2.proj_out.weight"],
                       state["gen_vision_model.decoder.conv_blocks.0.attn.2.proj_out.weight"])
    assert torch.equal(weights["model.vqmodel.quantize.embedding.weight"],
                       state["gen_vision_model.quantize.embedding.weight"])
    assert torch.equal(weights["model.generation_head.proj_out.bias"], state["gen_head.output_mlp_projector.bias"])


@pytest.mark.parametrize("section, key, value, message", [
    ("language_config", "rope_theta", 500000.0, r"language_config.rope_theta=500000.0; janus-lab converts 10000.0"),
    ("language_config", "num_key_value_heads", 8, r"num_key_value_heads=8 differs from num_attention_heads=32"),
    ("aligner_config", "n_embed", 2048, r"aligner_config.params.n_embed=2048; janus-lab converts 4096"),
    ("vision_config", "model_name", "siglip_so400m_patch14_384", r"model_name='siglip_so400m_patch14_384'"),
])
def test_configs_of_other_architectures_are_refused(special, section, key, value, message):
    config = copy.deepcopy(JANUS_PRO_7B)
    (config[section] if section == "language_config" else config[section]["params"])[key] = value
    with pytest.raises(ValueError, match=message):
        hf_config_from_deepseek(config, special)


def _transformers_config(text: dict, vision: dict, vq: dict, image_token_id: int = 100581) -> dict:
    """config.json in the transformers layout, as transformers' Janus conversion writes it
    (deepseek-community/Janus-Pro-1B's sizes by default)."""
    return {
        "architectures": ["JanusForConditionalGeneration"],
        "image_token_id": image_token_id,
        "model_type": "janus",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 100000, "eos_token_id": 100001,
            "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
            "intermediate_size": 5632, "max_position_embeddings": 16384, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "pad_token_id": 100002,
            "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
            "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 102400, **text},
        "torch_dtype": "bfloat16",
        "vision_config": {
            "attention_bias": True, "attention_dropout": 0.0, "depth": 2, "hidden_act": "gelu",
            "hidden_dropout_rate": 0.0, "hidden_size": 1024, "image_size": 384, "initializer_range": 0.02,
            "layer_norm_eps": 1e-06, "mlp_ratio": 4.0, "model_type": "janus_vision_model", "num_attention_heads": 16,
            "num_channels": 3, "num_hidden_layers": 24, "num_image_tokens": 576, "patch_size": 16,
            "projection_dim": 2048, "projection_dropout": 0.0, "select_layer": -1, "use_qk_norm": False, **vision},
        "vq_config": {
            "attn_resolutions": [], "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4],
            "double_latent": False, "dropout": 0.0, "embed_dim": 8, "image_token_embed_dim": 2048, "in_channels": 3,
            "initializer_range": 0.02, "latent_channels": 256, "model_type": "janus_vqgan", "num_embeddings": 16384,
            "num_hidden_layers": 2, "num_patches": 24, "num_res_blocks": 2, "out_channels": 3,
            "projection_dim": 2048, **vq},
    }


def test_transformers_layout_has_the_preset_architecture():
    with torch.device("meta"):
        community = JanusForConditionalGeneration(JanusConfig.from_dict(_transformers_config({}, {}, {})))
    preset = janus_pro_1b(device="meta").model
    shapes = lambda model: {k: v.shape for k, v in model.state_dict().items()}  # noqa: E731
    assert shapes(community) == shapes(preset)


def test_transformers_layout_folder_loads(tmp_path):
    tokenizer = build_debug_tokenizer()
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    config = _transformers_config(
        {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
         "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 1024, "bos_token_id": special.bos,
         "eos_token_id": special.eos, "pad_token_id": special.pad},
        {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, "image_size": 64,
         "num_image_tokens": 16, "projection_dim": 64},
        {"base_channels": 32, "image_token_embed_dim": 64, "projection_dim": 64, "num_patches": 4},
        image_token_id=special.image)
    folder = tmp_path / "Janus-Pro-1B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(JanusConfig.from_dict(config))
    weights = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}  # as released
    save_file(weights, folder / "model.safetensors")
    build_processor(tokenizer, 64, 16).save_pretrained(folder)

    bundle = load_pretrained(folder)
    assert bundle.num_image_tokens == 16 and bundle.special_ids == special
    assert bundle.model.config.text_config.hidden_size == 64
    loaded = bundle.model.state_dict()
    for key in ("model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                "model.vqmodel.decoder.up.0.block.0.conv1.weight", "model.generation_head.vision_head.weight",
                "model.language_model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(loaded[key], weights[key]), key
