"""The generation engine equals a plain reference loop token for token (docs/design.md, "Classifier-free guidance").

`reference_generate` below is the loop straight from the design: one request, one image at a
time, no padding, a DynamicCache, rows built with SequenceBuilder.prefix/unconditional/partial
and embed_inputs. The engine batches many requests of mixed tasks and lengths with left
padding, prefills only distinct rows, and samples all images at once; its codes must be the
same. benchmarks/generate.py times the engine against this same function.
"""

from __future__ import annotations

import inspect
import io
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from janus_lab.generation import (
    GenerationEngine,
    GenerationLimits,
    GenerationRequest,
    GenerationRequestError,
    PreparedRequest,
    filter_top_k,
    filter_top_p,
    image_seed,
    mix_guidance,
    sample_from_logits,
)
from janus_lab.generation.progress import PARTIAL_FILL, RequestProgress, partial_rows
from janus_lab.model import SequenceBuilder, cache_kwarg, debug, embed_inputs, encode_vq_codes, image_to_tensor

N = 16  # codes per image of the 64 px debug model


# --------------------------------------------------------------------------- the reference loop


def cfg_rows(bundle, request: GenerationRequest) -> tuple[list, list[torch.Tensor]]:
    """One image's CFG rows (text-to-image: cond, uncond; editing: full, part, uncond) and the
    request's input images as the model reads them."""
    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens)
    pixels = [image_to_tensor(Image.open(io.BytesIO(x)) if isinstance(x, bytes) else x, bundle.image_size)
              for x in request.input_images]
    if not pixels:
        cond = builder.prefix(request.prompt)
        return [cond, builder.unconditional(cond)], pixels
    full = builder.prefix(request.prompt, input_codes=encode_vq_codes(bundle.model, torch.stack(pixels)).tolist())
    return [full, builder.partial(full), builder.unconditional(full)], pixels


@torch.no_grad()
def reference_generate(bundle, request: GenerationRequest, seed: int) -> torch.Tensor:
    """docs/design.md, "Classifier-free guidance", literally: returns (parallel_size, N) codes for one request."""
    model, n = bundle.model, bundle.num_image_tokens
    core = model.model
    device = next(model.parameters()).device
    rows, pixels = cfg_rows(bundle, request)
    input_ids = torch.tensor([r.input_ids for r in rows], device=device)
    gen_codes = torch.tensor([r.gen_codes for r in rows], device=device)
    pixel_values = torch.stack([p for r in rows for p in pixels[:r.num_input_images]]).to(device) if pixels else None
    w, w2, temperature = request.cfg_weight, request.cfg_weight2, request.temperature

    images = []
    for j in range(request.parallel_size):
        generator = torch.Generator().manual_seed(image_seed(seed, j))
        uniforms = torch.rand(n, generator=generator, dtype=torch.float64)
        cache = DynamicCache(config=core.language_model.config)
        embeds = embed_inputs(model, input_ids, gen_codes, pixel_values)
        codes = []
        for step in range(n):
            hidden = core.language_model(inputs_embeds=embeds, use_cache=True,
                                         **{cache_kwarg(core.language_model): cache}).last_hidden_state[:, -1]
            logits = core.generation_head(hidden).float()
            if pixels:
                c = (logits[0] + w2 * logits[1]) / (1 + w2)
            else:
                c = logits[0]
            u = logits[-1]
            guided = u + w * (c - u)
            if temperature == 0:
                code = int(guided.argmax())
            else:
                scores = guided / temperature
                if request.top_k is not None:
                    kth = torch.topk(scores, request.top_k).values[-1]
                    scores = scores.masked_fill(scores < kth, -math.inf)
                if request.top_p is not None and request.top_p < 1:
                    probs = torch.softmax(scores, dim=-1)
                    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
                    mass_before = sorted_probs.cumsum(-1) - sorted_probs
                    scores = scores.clone()
                    scores[order[mass_before >= request.top_p]] = -math.inf
                cdf = torch.softmax(scores, dim=-1).double().cumsum(-1)
                code = min(int(torch.searchsorted(cdf, uniforms[step] * cdf[-1], right=True)), cdf.numel() - 1)
            codes.append(code)
            # The sampled code's generation embedding is the next input of every row.
            embeds = model.prepare_embeddings_for_image_generation(
                torch.tensor([[code]] * len(rows), device=device))
        images.append(codes)
    return torch.tensor(images)


@torch.no_grad()
def published_generate(bundle, request: GenerationRequest) -> torch.Tensor:
    """The published Janus / Janus-4o inference loop, greedy: `parallel_size` images of one prompt
    in one batch, every image with its own CFG rows (cond, uncond; editing: full, part, uncond),
    all rows prefilled, a dynamic cache, eager. Returns (parallel_size, N) codes.

    The baseline a user would otherwise run (benchmarks/generate.py): greedy, so that it can be
    compared code for code (the published loop samples with `torch.multinomial`)."""
    model, n = bundle.model, bundle.num_image_tokens
    core = model.model
    device = next(model.parameters()).device
    kinds, pixels = cfg_rows(bundle, request)
    rows = kinds * request.parallel_size  # image j owns rows j*K .. j*K+K-1
    input_ids = torch.tensor([r.input_ids for r in rows], device=device)
    gen_codes = torch.tensor([r.gen_codes for r in rows], device=device)
    pixel_values = torch.stack([p for r in rows for p in pixels[:r.num_input_images]]).to(device) if pixels else None
    w, w2, k = request.cfg_weight, request.cfg_weight2, len(kinds)
    cache = DynamicCache(config=core.language_model.config)
    embeds = embed_inputs(model, input_ids, gen_codes, pixel_values)
    codes = []
    for _ in range(n):
        hidden = core.language_model(inputs_embeds=embeds, use_cache=True,
                                     **{cache_kwarg(core.language_model): cache}).last_hidden_state[:, -1]
        logits = core.generation_head(hidden).float()
        c = (logits[0::k] + w2 * logits[1::k]) / (1 + w2) if pixels else logits[0::k]
        u = logits[k - 1::k]
        code = (u + w * (c - u)).argmax(dim=-1)  # (parallel_size,)
        codes.append(code)
        embeds = model.prepare_embeddings_for_image_generation(code.repeat_interleave(k)).unsqueeze(1)
    return torch.stack(codes, dim=1).cpu()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle():
    bundle = debug()
    bundle.model.eval()  # the reference loop assumes it; the engine sets it itself
    return bundle


@pytest.fixture(scope="module")
def engine(bundle):
    return GenerationEngine.from_bundle(bundle)


def picture(seed: int, size=(80, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SAMPLED = {"temperature": 1.0, "top_k": 64, "top_p": 0.9}

# One batch mixing tasks, prompt lengths, guidance weights, greedy and sampled requests.
BATCH = {
    "t2i-greedy": GenerationRequest("a red circle", parallel_size=2, temperature=0, seed=11),
    "ti2i-1-greedy": GenerationRequest("make the background blue and the circle much larger please",
                                       input_images=[picture(1)], temperature=0, seed=12),
    "ti2i-2-greedy": GenerationRequest("put the cat next to the dog", input_images=[picture(2), picture(3)],
                                       temperature=0, cfg_weight=3.0, cfg_weight2=2.0, seed=13),
    "t2i-sampled": GenerationRequest("two small green triangles under a big yellow sun in a pale sky",
                                     parallel_size=2, seed=21, **SAMPLED),
    "t2i-sampled-plain": GenerationRequest("a dog", temperature=0.8, seed=22),
    "ti2i-1-sampled": GenerationRequest("turn it into a painting", input_images=[png_bytes(picture(4))],
                                        seed=23, **SAMPLED),
    "ti2i-2-sampled": GenerationRequest("swap the two shapes", input_images=[picture(5), picture(6, (40, 90))],
                                        seed=24, cfg_weight=4.0, cfg_weight2=1.0, temperature=1.0, top_k=200),
}


@pytest.fixture(scope="module")
def batched(engine):
    return dict(zip(BATCH, engine.generate(list(BATCH.values()))))


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", list(BATCH))
def test_batched_engine_equals_reference(bundle, batched, name):
    request = BATCH[name]
    expected = reference_generate(bundle, request, seed=request.seed)
    result = batched[name]
    assert result.codes.shape == (request.parallel_size, N)
    assert result.seed == request.seed
    assert torch.equal(result.codes, expected), f"{name}: {result.codes.tolist()} != {expected.tolist()}"


def test_the_engine_equals_the_published_batched_loop_under_greedy_decoding(bundle, engine):
    requests = [GenerationRequest("a red circle", parallel_size=3, temperature=0, seed=1),
                GenerationRequest("put the cat next to the dog", input_images=[picture(2), picture(3)],
                                  parallel_size=2, temperature=0, cfg_weight=3.0, cfg_weight2=2.0, seed=2)]
    for request, result in zip(requests, engine.generate(requests, decode_images=False)):
        assert torch.equal(result.codes, published_generate(bundle, request)), request.prompt


def test_requests_of_one_prefix_length_share_one_unconditional_prefill_row(engine):
    same_length = [GenerationRequest(p, seed=i) for i, p in enumerate(["a red circle", "a red square", "a big circle"])]
    lengths = {len(engine.builder.prefix(r.prompt)) for r in same_length}
    assert len(lengths) == 1  # the check below needs prompts of one token length
    batch = engine.build_cfg_batch(engine.validate(same_length + [GenerationRequest("a dog on a long walk", seed=9)]))
    assert batch.prefill_embeds.shape[0] == 4 + 2  # 4 conditional rows, 2 unconditional (two lengths)
    assert batch.num_rows == 8


def test_text_to_image_and_edits_decode_in_separate_length_groups_when_it_spares_enough_padding(engine, bundle):
    # Prefix lengths at 384 px: text-to-image tens of tokens, edits 1 + 2 x 576 per input image.
    def requests(n_images):
        lengths = [10, 22, 1170, 2330, 11, 1190]
        return [PreparedRequest(GenerationRequest("x", parallel_size=n_images), prefix_length=n) for n in lengths]

    # 3 text-to-image requests x 8 images x 2 rows x ~1,200 padded tokens: worth a batch of their own.
    assert engine.length_groups(requests(8)) == [[0, 1, 4], [2, 3, 5]]  # 2330 <= 2 x 1170 + slack
    # One image each: 6 rows x ~1,200 tokens of padding cost less than a second decode loop.
    assert engine.length_groups(requests(1)) == [list(range(6))]
    static = GenerationEngine.from_bundle(bundle, static_cache=True)
    assert static.length_groups(requests(8)) == [list(range(6))]


def test_results_do_not_depend_on_how_the_batch_is_split_into_length_groups(monkeypatch, engine, batched):
    import janus_lab.generation.engine as engine_module

    monkeypatch.setattr(engine_module, "LENGTH_GROUP_MIN_PADDING", 0)  # split wherever lengths differ 2x
    prepared = engine.validate(list(BATCH.values()))
    assert len(engine.length_groups(prepared)) == 2
    for name, result in zip(BATCH, engine.generate_prepared(prepared, decode_images=False)):
        assert torch.equal(result.codes, batched[name].codes), name


def test_static_cache_path_equals_dynamic(bundle, batched):
    # The GPU path (static cache, rows and length rounded up to buckets) on the CPU, uncompiled.
    static = GenerationEngine.from_bundle(bundle, static_cache=True)
    names = ["t2i-greedy", "ti2i-2-greedy", "t2i-sampled", "ti2i-1-sampled"]
    for name, result in zip(names, static.generate([BATCH[n] for n in names], decode_images=False)):
        assert torch.equal(result.codes, batched[name].codes), name


def test_t2i_greedy_equals_transformers_generate(bundle, batched):
    """transformers' own CFG loop (static cache) gives the same codes for text-to-image.

    Apples to apples: greedy (it refuses num_return_sequences > 1 then; both of our greedy
    images are the same anyway), guidance 5 (it crashes for <= 1). Its unconditional row pads
    every token except BOS and <boi> *by token id, wherever they are*: a T2I prefix has exactly
    one of each, so that row equals ours (for an editing prefix it would keep the input images'
    <boi> too, and it ignores pixel_values: it cannot do editing). Its position ids count left
    padding, but rotary attention depends only on relative positions, so a left-padded batch of
    two prompts gives the same codes as well.
    """
    model, special = bundle.model, bundle.special_ids
    builder = SequenceBuilder(bundle.processor.tokenizer, N)
    short, long = BATCH["t2i-greedy"], replace(BATCH["t2i-sampled"], temperature=0, top_k=None, top_p=None)
    prefixes = [builder.prefix(r.prompt).input_ids for r in (short, long)]
    assert all(ids.count(special.boi) == 1 and ids.count(special.bos) == 1 for ids in prefixes)
    length = max(len(ids) for ids in prefixes)
    input_ids = torch.tensor([[special.pad] * (length - len(ids)) + ids for ids in prefixes])
    attention_mask = (input_ids != special.pad).long()
    saved = model.generation_config
    try:
        # A new object: editing the loaded one in place loses generation_kwargs
        # (docs/platform-notes.md, "transformers' Janus").
        model.generation_config = GenerationConfig(
            num_return_sequences=1, do_sample=False, guidance_scale=5.0,
            pad_token_id=special.pad, bos_token_id=special.bos, generation_kwargs={"boi_token_id": special.boi})
        with torch.no_grad():
            single = model.generate(inputs=input_ids[:1, length - len(prefixes[0]):],
                                    attention_mask=attention_mask[:1, length - len(prefixes[0]):],
                                    generation_mode="image")
            padded = model.generate(inputs=input_ids, attention_mask=attention_mask, generation_mode="image")
    finally:
        model.generation_config = saved
    ours = batched["t2i-greedy"].codes
    assert single.shape == (1, N) and torch.equal(ours[0], ours[1])
    assert torch.equal(single[0], ours[0])
    assert torch.equal(padded[0], ours[0])
    assert torch.equal(padded[1], reference_generate(bundle, long, seed=0)[0])


def test_partial_images_come_at_evenly_spread_rows_with_the_codes_so_far(engine, batched):
    seen = []
    progress = RequestProgress(partial_images=3, on_partial=lambda index, codes, rows: seen.append((index, codes, rows)))
    names = list(BATCH)
    watched = names.index("ti2i-2-sampled")
    engine.generate_prepared(engine.validate(list(BATCH.values())),
                             progress=[progress if i == watched else None for i in range(len(names))])
    side = math.isqrt(N)
    assert [(index, rows) for index, _, rows in seen] == list(enumerate(partial_rows(3, side)))
    final = batched["ti2i-2-sampled"].codes
    for _, codes, rows in seen:
        assert torch.equal(codes[:, :rows * side], final[:, :rows * side])
    image = engine.decode_partial(seen[0][1], seen[0][2])[0]
    pixels = np.asarray(image)
    assert (pixels[image.height * seen[0][2] // side:] == PARTIAL_FILL).all()
    assert not (pixels[:image.height * seen[0][2] // side] == PARTIAL_FILL).all()


def test_partial_rows_are_spread_and_checked():
    assert partial_rows(0, 24) == [] and partial_rows(1, 24) == [12] and partial_rows(3, 24) == [6, 12, 18]
    assert partial_rows(3, 4) == [1, 2, 3] and partial_rows(3, 2) == [1]
    with pytest.raises(ValueError, match="between 0 and 3"):
        partial_rows(4, 24)


@pytest.mark.parametrize("leaving", ["t2i-greedy", "ti2i-2-greedy", "t2i-sampled"])
def test_a_request_whose_watcher_leaves_frees_its_rows_and_the_others_are_unchanged(engine, batched, leaving):
    names = list(BATCH)
    freed = []
    progress = RequestProgress(partial_images=1, on_freed=lambda step, rows: freed.append((step, rows)))
    progress.on_partial = lambda index, codes, rows: progress.cancelled.set()  # leaves at its first partial
    results = engine.generate_prepared(engine.validate(list(BATCH.values())),
                                       progress=[progress if name == leaving else None for name in names])
    request = BATCH[leaving]
    rows_per_image = 3 if request.input_images else 2
    side = math.isqrt(N)
    assert freed == [(partial_rows(1, side)[0] * side - 1, rows_per_image * request.parallel_size)]
    for name, result in zip(names, results):
        assert result.cancelled == (name == leaving)
        if name != leaving:
            assert torch.equal(result.codes, batched[name].codes), name
    assert results[names.index(leaving)].images == []


def test_the_static_cache_keeps_a_leaving_requests_rows_and_the_others_unchanged(bundle, batched):
    static = GenerationEngine.from_bundle(bundle, static_cache=True)
    progress = RequestProgress()
    progress.cancelled.set()
    names = ["t2i-greedy", "ti2i-1-sampled"]
    results = static.generate_prepared(static.validate([BATCH[n] for n in names]), progress=[progress, None],
                                       decode_images=False)
    assert torch.equal(results[1].codes, batched["ti2i-1-sampled"].codes)


def test_result_does_not_depend_on_batch_or_parallel_size(engine, batched):
    request = BATCH["t2i-sampled"]
    alone = engine.generate([replace(request, parallel_size=1)], decode_images=False)[0]
    assert torch.equal(alone.codes[0], batched["t2i-sampled"].codes[0])
    other_seed = engine.generate([replace(request, seed=99)], decode_images=False)[0]
    assert not torch.equal(other_seed.codes[0], alone.codes[0])
    # Two images of one request draw different random streams.
    assert not torch.equal(batched["t2i-sampled"].codes[0], batched["t2i-sampled"].codes[1])


def test_results_carry_images_and_a_seed(engine, batched):
    result = batched["ti2i-1-greedy"]
    assert [image.size for image in result.images] == [(64, 64)]
    assert result.images[0].mode == "RGB"
    unseeded = engine.generate([GenerationRequest("a cat", temperature=0.5)], decode_images=False)[0]
    again = engine.generate([GenerationRequest("a cat", temperature=0.5, seed=unseeded.seed)], decode_images=False)[0]
    assert torch.equal(unseeded.codes, again.codes)


def test_generation_leaves_the_training_mode_as_it_was(bundle):
    model = bundle.model
    engine = GenerationEngine.from_bundle(bundle)
    model.train()
    model.model.vqmodel.eval()
    try:
        engine.generate([GenerationRequest("a cat", temperature=0)], decode_images=False)
        assert model.training and model.model.language_model.training
        assert not model.model.vqmodel.training
    finally:
        model.eval()


def test_generate_in_batches_splits_without_changing_results(engine, batched):
    names = ["t2i-greedy", "ti2i-1-sampled", "t2i-sampled"]
    out = dict(engine.generate_in_batches([BATCH[n] for n in names], max_images=2, decode_images=False))
    assert sorted(out) == [0, 1, 2]
    for index, name in enumerate(names):
        assert torch.equal(out[index].codes, batched[name].codes), name


def test_generate_in_batches_can_refuse_a_bad_request_alone(engine, batched):
    names = ["t2i-greedy", "ti2i-1-sampled"]
    requests = [BATCH[names[0]], GenerationRequest("a red circle " * 200, seed=1), BATCH[names[1]]]
    with pytest.raises(GenerationRequestError, match="more than the limit"):
        engine.generate_in_batches(requests)  # by default one bad request refuses the whole run
    refused = {}
    out = dict(engine.generate_in_batches(requests, max_images=2, decode_images=False, on_refused=refused.__setitem__))
    assert sorted(out) == [0, 2] and list(refused) == [1]
    assert refused[1].field == "requests[1].prompt" and "more than the limit of 256" in str(refused[1])
    for index, name in ((0, names[0]), (2, names[1])):
        assert torch.equal(out[index].codes, batched[name].codes), name
    with pytest.raises(GenerationRequestError, match="is empty"):
        engine.generate_in_batches([], on_refused=refused.__setitem__)


def test_input_images_are_letterboxed_for_the_vq_encoder_and_siglip(monkeypatch, engine):
    """An upload of any shape reaches both image paths as Janus's processor would square it."""
    import janus_lab.generation.engine as engine_module
    from janus_lab.data.images import letterbox
    from janus_lab.model.vq import pixels_to_tensor

    seen = {}

    def spy(name, function):
        def wrapper(model, *args):
            seen[name] = args[-1]
            return function(model, *args)
        monkeypatch.setattr(engine_module, name, wrapper)

    spy("encode_vq_codes", engine_module.encode_vq_codes)
    spy("embed_inputs", engine_module.embed_inputs)
    wide = picture(7, (100, 60))
    engine.build_cfg_batch(engine.validate([GenerationRequest("make it blue", input_images=[png_bytes(wide)])]))
    expected = pixels_to_tensor(np.asarray(letterbox(wide, 64)))
    assert torch.equal(seen["encode_vq_codes"][0], expected)
    assert all(torch.equal(p, expected) for p in seen["embed_inputs"])  # SigLIP of the full and part rows
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(expected[:, :13], torch.full_like(expected[:, :13], grey))  # 64 x 38 between bars


# --------------------------------------------------------------------------- sampling pieces


def test_mix_guidance_formulas():
    c, u, p = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 4.0]])
    w, w2 = torch.tensor([[5.0]]), torch.tensor([[3.0]])
    assert torch.equal(mix_guidance(c, u, w), torch.tensor([[6.0, -4.0]]))
    folded = (c + 3 * p) / 4  # (full + w2 * part) / (1 + w2)
    assert torch.allclose(mix_guidance(c, u, w, p, w2), u + 5 * (folded - u))


def test_top_k_matches_transformers():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    for k in (1, 7, 50):
        expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(filter_top_k(logits, torch.full((3,), k)), expected)
    assert torch.equal(filter_top_k(logits, torch.zeros(3, dtype=torch.long)), logits)  # 0 = no limit


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_top_p(logits, torch.tensor([p]))).squeeze(0).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    random_logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))
    expected = TopPLogitsWarper(top_p=0.7)(None, random_logits.clone())
    assert torch.equal(torch.isinf(filter_top_p(random_logits, torch.full((4,), 0.7))), torch.isinf(expected))


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, -math.inf, math.log(3.0), -math.inf]]).expand(4000, 4)
    codes = sample_from_logits(logits, torch.rand(4000, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64))
    counts = torch.bincount(codes, minlength=4).tolist()
    assert counts[1] == counts[3] == 0, "codes of zero probability are never drawn"
    assert abs(counts[2] / 4000 - 0.75) < 0.03
    edge = sample_from_logits(logits[:2], torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64))
    assert edge.tolist() == [0, 2]


# --------------------------------------------------------------------------- bad input


def _no_compute(monkeypatch, engine):
    def refuse(*args, **kwargs):
        raise AssertionError("model compute ran for a bad request")
    monkeypatch.setattr(engine, "build_cfg_batch", refuse)


@pytest.mark.parametrize(("changes", "field", "reason"), [
    ({"prompt": ""}, "prompt", "is empty"),
    ({"prompt": "   "}, "prompt", "is empty"),
    ({"prompt": "a red circle " * 200}, "prompt", "more than the limit"),
    ({"input_images": [b"definitely not a png"]}, "input_images[0]", "not an image"),
    ({"input_images": ["photo.png"]}, "input_images[0]", "PIL image or image bytes"),
    ({"parallel_size": 0}, "parallel_size", ">= 1"),
    ({"parallel_size": 17}, "parallel_size", "<= 16"),
    ({"parallel_size": 2.0}, "parallel_size", "integer"),
    ({"cfg_weight": math.nan}, "cfg_weight", "finite"),
    ({"cfg_weight": math.inf}, "cfg_weight", "finite"),
    ({"cfg_weight2": -1.0}, "cfg_weight2", ">= 0"),
    ({"cfg_weight2": math.inf}, "cfg_weight2", "finite"),
    ({"temperature": -0.1}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_k": 0}, "top_k", ">= 1"),
    ({"seed": -1}, "seed", ">= 0"),
])
def test_bad_request_is_refused_before_compute(monkeypatch, engine, changes, field, reason):
    _no_compute(monkeypatch, engine)
    bad = replace(GenerationRequest("a red circle"), **changes)
    with pytest.raises(GenerationRequestError, match=re.escape(reason)) as caught:
        engine.generate([GenerationRequest("a good one"), bad])
    assert caught.value.field == f"requests[1].{field}"
    assert isinstance(caught.value, ValueError)


def test_oversized_image_is_refused_from_its_header(monkeypatch, bundle):
    engine = GenerationEngine.from_bundle(bundle, limits=GenerationLimits(max_input_pixels=100 * 100))
    _no_compute(monkeypatch, engine)
    with pytest.raises(GenerationRequestError, match="more than the limit of 10000") as caught:
        engine.generate([GenerationRequest("edit", input_images=[png_bytes(picture(0, (200, 120)))])])
    assert caught.value.field == "requests[0].input_images[0]"
    truncated = png_bytes(picture(0))[:200]
    with pytest.raises(GenerationRequestError, match="input_images"):
        engine.generate([GenerationRequest("edit", input_images=[truncated])])


def test_batch_limits(monkeypatch, bundle):
    engine = GenerationEngine.from_bundle(bundle, limits=GenerationLimits(max_batch_images=4, max_input_images=1))
    _no_compute(monkeypatch, engine)
    with pytest.raises(GenerationRequestError, match="5 images in total") as caught:
        engine.generate([GenerationRequest("a", parallel_size=3), GenerationRequest("b", parallel_size=2)])
    assert caught.value.field == "requests"
    with pytest.raises(GenerationRequestError, match="more than the limit of 1"):
        engine.generate([GenerationRequest("a", input_images=[picture(0), picture(1)])])
    with pytest.raises(GenerationRequestError, match="is empty"):
        engine.generate([])


def test_context_limit(monkeypatch, bundle):
    # Four 16-token input images fit the debug model's 4096 positions; the 576-token model's
    # context is checked the same way: conditioning + N codes must fit.
    engine = GenerationEngine.from_bundle(bundle)
    engine.max_sequence_length = 60
    _no_compute(monkeypatch, engine)
    with pytest.raises(GenerationRequestError, match="exceeds the model's context of 60"):
        engine.generate([GenerationRequest("edit this", input_images=[picture(0)])])


def test_request_from_dict():
    request = GenerationRequest.from_dict({"prompt": "a cat", "seed": 3}, defaults={"parallel_size": 2, "seed": 0})
    assert (request.prompt, request.seed, request.parallel_size) == ("a cat", 3, 2)
    with pytest.raises(GenerationRequestError, match="unknown field") as caught:
        GenerationRequest.from_dict({"prompt": "a cat", "temprature": 1.0})
    assert caught.value.field == "temprature"
    with pytest.raises(GenerationRequestError, match="is missing"):
        GenerationRequest.from_dict({"seed": 1})


def test_the_kv_cache_goes_by_the_name_the_installed_transformers_takes():
    class Renamed(torch.nn.Module):  # transformers 5.24 on
        def forward(self, inputs_embeds=None, cache=None, use_cache=None):
            return inputs_embeds

    class Original(torch.nn.Module):  # earlier 5.x
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):
            return inputs_embeds

    assert cache_kwarg(Renamed()) == "cache" and cache_kwarg(Original()) == "past_key_values"
    language_model = debug().model.model.language_model
    assert cache_kwarg(language_model) in inspect.signature(language_model.forward).parameters


# --------------------------------------------------------------------------- GPU path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_static_cache_engine_equals_reference_on_cuda():
    bundle = debug(device="cuda")
    engine = GenerationEngine.from_bundle(bundle, static_cache=True, compile_step=True)
    names = ["t2i-greedy", "ti2i-2-greedy", "t2i-sampled", "ti2i-1-sampled"]
    for _ in range(2):  # the second call replays the captured graphs
        results = engine.generate([BATCH[n] for n in names], decode_images=False)
        for name, result in zip(names, results):
            expected = reference_generate(bundle, BATCH[name], seed=BATCH[name].seed)
            assert torch.equal(result.codes, expected), name
