"""Model core: builders, tokenizer, weights I/O, DeepSeek conversion, VQ codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from janus_lab.model import debug, encode_vq_codes, janus_pro_1b, janus_pro_7b
from janus_lab.model.convert import (
    convert_deepseek_checkpoint,
    convert_state_dict_to_hf,
    hf_key_from_deepseek,
    write_deepseek_checkpoint,
)
from janus_lab.model.tokenizer import build_debug_tokenizer
from janus_lab.model.weights import PickleCheckpointError, build_bundle, load_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_not_shadowed():
    # platform/ holds the package but must never become a package itself.
    # Run from the repository root, where `platform/` is on the path first: the import must
    # still find the standard library's module (ray, torch and uuid import it).
    import platform as stdlib_platform

    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.__file__); print(platform.system())"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    module_file, system = out.stdout.split()
    assert Path(module_file).resolve() == Path(stdlib_platform.__file__).resolve()
    assert REPO not in Path(module_file).resolve().parents
    assert system == stdlib_platform.system()
    assert not (REPO / "platform" / "__init__.py").exists()


@pytest.fixture(scope="module")
def bundle():
    return debug()


def test_debug_preset_shapes(bundle):
    config = bundle.model.config
    assert config.text_config.hidden_size == 64 and config.text_config.num_hidden_layers == 2
    assert bundle.num_image_tokens == 16 and bundle.image_size == 64
    assert debug(image_size=384).num_image_tokens == 576
    assert not config.tie_word_embeddings
    assert bundle.model.lm_head.weight.data_ptr() != bundle.model.model.language_model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in bundle.model.model.vqmodel.parameters())


@pytest.mark.parametrize("builder, hidden, layers, heads, ffn", [
    (janus_pro_1b, 2048, 24, 16, 5632), (janus_pro_7b, 4096, 30, 32, 11008)])
def test_real_presets_match_released_shapes(builder, hidden, layers, heads, ffn):
    model = builder(device="meta").model
    text, vision, vq = model.config.text_config, model.config.vision_config, model.config.vq_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        hidden, layers, heads, ffn)
    assert text.vocab_size == 102400 and not model.config.tie_word_embeddings
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (384, 16, 1024, 24)
    assert (vq.num_embeddings, vq.embed_dim) == (16384, 8)
    assert model.model.generation_head.vision_head.weight.shape == (16384, hidden)
    assert builder(device="meta", num_layers=2).model.config.text_config.num_hidden_layers == 2


def test_debug_tokenizer_is_deterministic_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = build_debug_tokenizer(), build_debug_tokenizer()
    text = "<|User|>: make the red circle blue\n\n<|Assistant|>:<begin_of_image>"
    assert a.encode(text) == b.encode(text)
    assert a.convert_ids_to_tokens(a.encode(text))[-1] == "<begin_of_image>"
    a.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == a.encode(text)


def test_save_and_load_round_trip(bundle, tmp_path):
    save_pretrained(bundle, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert not list((tmp_path / "ckpt").glob("*.bin"))
    loaded = load_pretrained(tmp_path / "ckpt")
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert loaded.special_ids == bundle.special_ids
    assert loaded.num_image_tokens == bundle.num_image_tokens


def test_training_builds_float32_master_weights_from_a_bfloat16_checkpoint(tmp_path):
    from janus_lab.train.config import ModelConfig

    save_pretrained(debug(seed=3, dtype=torch.bfloat16), tmp_path / "bf16")
    assert {p.dtype for p in load_pretrained(tmp_path / "bf16").model.parameters()} == {torch.bfloat16}
    built = build_bundle(ModelConfig(weights=str(tmp_path / "bf16")), init_seed=0)
    assert {p.dtype for p in built.model.parameters()} == {torch.float32}


def test_pickle_checkpoints_are_refused(bundle, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    bundle.model.config.save_pretrained(folder)
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="pickle weights only"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


def test_deepseek_key_names():
    # Names as they appear in the released Janus-Pro checkpoints.
    assert hf_key_from_deepseek("language_model.model.layers.3.self_attn.q_proj.weight") == \
        "model.language_model.layers.3.self_attn.q_proj.weight"
    assert hf_key_from_deepseek("language_model.lm_head.weight") == "lm_head.weight"
    assert hf_key_from_deepseek("vision_model.vision_tower.blocks.7.attn.proj.bias") == \
        "model.vision_model.encoder.layers.7.self_attn.projection_layer.bias"
    assert hf_key_from_deepseek("vision_model.vision_tower.norm.weight") == "model.vision_model.post_layernorm.weight"
    assert hf_key_from_deepseek("gen_vision_model.encoder.conv_blocks.2.res.1.norm1.weight") == \
        "model.vqmodel.encoder.down.2.block.1.norm1.weight"
    assert hf_key_from_deepseek("gen_vision_model.decoder.mid.1.q.weight") == "model.vqmodel.decoder.mid.attn_1.q.weight"
    assert hf_key_from_deepseek("gen_head.output_mlp_projector.weight") == "model.generation_head.proj_out.weight"
    assert hf_key_from_deepseek("gen_aligner.layers.2.weight") == "model.generation_aligner.hidden_layers.0.weight"
    assert hf_key_from_deepseek("aligner.layers.0.bias") == "model.aligner.fc1.bias"
    assert hf_key_from_deepseek("gen_embed.weight") == "model.generation_embeddings.weight"
    assert hf_key_from_deepseek("gen_vision_model.quantize.codebook_used") is None
    assert hf_key_from_deepseek("vision_model.vision_tower.attn_pool.latent") is None
    with pytest.raises(KeyError, match="no conversion rule"):
        hf_key_from_deepseek("something.else.weight")
    fused = torch.arange(12.0).reshape(6, 2)
    split = convert_state_dict_to_hf({"vision_model.vision_tower.blocks.0.attn.qkv.weight": fused})
    prefix = "model.vision_model.encoder.layers.0.self_attn."
    assert torch.equal(split[prefix + "k_proj.weight"], fused[2:4])
    pos = convert_state_dict_to_hf({"vision_model.vision_tower.pos_embed": torch.zeros(1, 16, 32)})
    assert pos["model.vision_model.embeddings.position_embedding.weight"].shape == (16, 32)


def test_deepseek_checkpoint_round_trip(bundle, tmp_path):
    original = write_deepseek_checkpoint(bundle.model, bundle.processor.tokenizer, tmp_path / "deepseek")
    from safetensors.torch import load_file
    keys = set(load_file(original / "model.safetensors"))
    assert "vision_model.vision_tower.blocks.0.attn.qkv.weight" in keys
    assert "gen_vision_model.encoder.conv_blocks.0.res.0.conv1.weight" in keys
    assert not any(k.startswith("model.") for k in keys)
    converted = load_pretrained(convert_deepseek_checkpoint(original, tmp_path / "hf"))
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(value, converted.model.state_dict()[key]), key
    ids = torch.tensor([[0, 6, 33, 4]])
    with torch.no_grad():
        assert torch.equal(bundle.model(input_ids=ids).logits, converted.model(input_ids=ids).logits)


def test_converter_refuses_pickle_without_opt_in(bundle, tmp_path):
    folder = write_deepseek_checkpoint(bundle.model, bundle.processor.tokenizer, tmp_path / "deepseek")
    from safetensors.torch import load_file
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    with pytest.raises(ValueError, match="--allow-pickle"):
        convert_deepseek_checkpoint(folder, tmp_path / "out")
    converted = load_pretrained(convert_deepseek_checkpoint(folder, tmp_path / "out", allow_pickle=True))
    assert torch.equal(converted.model.lm_head.weight, bundle.model.lm_head.weight)


def _direct_codes(model, pixels, normalise: bool) -> torch.Tensor:
    """Nearest code by explicit pairwise distances, independent of encode_vq_codes."""
    vq = model.model.vqmodel
    with torch.no_grad():
        latent = vq.quant_conv(vq.encoder(pixels))
    vectors = latent.permute(0, 2, 3, 1).reshape(pixels.shape[0], -1, latent.shape[1])
    codebook = vq.quantize.embedding.weight
    if normalise:
        vectors, codebook = F.normalize(vectors, dim=-1), F.normalize(codebook, dim=-1)
    distances = torch.cdist(vectors.double(), codebook.double().unsqueeze(0).expand(pixels.shape[0], -1, -1))
    return distances.argmin(dim=-1)


def test_vq_encode_matches_direct_normalised_search(bundle):
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = encode_vq_codes(bundle.model, pixels)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64
    assert torch.equal(codes, _direct_codes(bundle.model, pixels, normalise=True))


def test_transformers_encode_differs_where_norms_matter(bundle):
    # transformers' encode searches on the raw latent (Euclidean distance, so codebook norms
    # count); the normalised search compares directions only. Show that they part on many codes
    # and that, where they do, each choice is right by its own rule and wrong by the other's.
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours = encode_vq_codes(bundle.model, pixels)
    with torch.no_grad():
        theirs = bundle.model.model.vqmodel.encode(pixels).image_tokens.view(4, -1)
    assert torch.equal(theirs, _direct_codes(bundle.model, pixels, normalise=False))
    differ = ours != theirs
    assert differ.float().mean() > 0.25, "expected the unnormalised search to disagree on many codes"
    vq = bundle.model.model.vqmodel
    with torch.no_grad():
        latent = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1).reshape(4, 16, -1)[differ]
    codebook = vq.quantize.embedding.weight
    cosine = lambda codes: F.cosine_similarity(latent, codebook[codes[differ]], dim=-1)  # noqa: E731
    distance = lambda codes: (latent - codebook[codes[differ]]).norm(dim=-1)  # noqa: E731
    assert bool((cosine(ours) > cosine(theirs)).all())
    assert bool((distance(theirs) < distance(ours)).all())
