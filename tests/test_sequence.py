"""Sequence layout, masking and the generation loss (docs/design.md, "Sequence layout", "Masking", "Loss")."""

from __future__ import annotations

import pytest
import torch

from janus_lab.model import (
    GenerationObjective,
    MaskDecision,
    SequenceBuilder,
    collate_samples,
    debug,
    draw_mask_decision,
)
from janus_lab.model.sequence import IGNORE_INDEX, NO_CODE, PromptTooLongError

N = 16


@pytest.fixture(scope="module")
def bundle():
    return debug()


@pytest.fixture(scope="module")
def builder(bundle):
    return SequenceBuilder(bundle.processor.tokenizer, N, max_text_tokens=32)


def codes(seed: int) -> list[int]:
    return torch.randint(0, 16384, (N,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_t2i_layout(builder):
    s = builder.special
    target = codes(0)
    sample = builder.training_sample("a red circle", target)
    text = builder.tokenizer.encode("<|User|>: a red circle\n\n<|Assistant|>:", add_special_tokens=False)
    prefix = [s.bos, *text, s.boi]
    assert sample.input_ids == prefix + [s.pad] * (N - 1)
    assert sample.gen_codes == [NO_CODE] * len(prefix) + target[:-1]
    # <boi> predicts c_0; c_i predicts c_{i+1}: all N codes supervised, c_0 included.
    assert sample.labels == [IGNORE_INDEX] * (len(prefix) - 1) + target
    assert sample.labels[sample.input_ids.index(s.boi)] == target[0]


@pytest.mark.parametrize("num_inputs", [1, 2])
def test_ti2i_layout(builder, num_inputs):
    s = builder.special
    inputs = [codes(10 + k) for k in range(num_inputs)]
    sample = builder.training_sample("make it blue", codes(0), inputs)
    user = builder.tokenizer.encode("<|User|>: ", add_special_tokens=False)
    position = 1 + len(user)
    assert sample.input_ids[:position] == [s.bos, *user]
    for k in range(num_inputs):
        block = sample.input_ids[position: position + 2 * N + 4]
        assert block == [s.boi, *[s.image] * N, s.eoi, s.boi, *[s.pad] * N, s.eoi]
        assert sample.gen_codes[position + N + 3: position + 2 * N + 3] == inputs[k]
        position += 2 * N + 4
    assert sample.num_input_images == num_inputs
    assert sum(label != IGNORE_INDEX for label in sample.labels) == N
    assert sample.input_ids.count(s.image) == num_inputs * N


def test_masking_text_drop_and_image_drop(builder):
    s = builder.special
    dropped = builder.training_sample("a red circle", codes(0), mask=MaskDecision(drop_text=True))
    boi = dropped.input_ids.index(s.boi)
    assert dropped.input_ids[0] == s.bos and set(dropped.input_ids[1:boi]) == {s.pad}
    assert dropped.labels == builder.training_sample("a red circle", codes(0)).labels

    inputs = [codes(10), codes(11)]
    sample = builder.training_sample("swap them", codes(0), inputs, MaskDecision(drop_images=(True, False)))
    gen_slots = [c for c in sample.gen_codes[: sample.labels.index(codes(0)[0])] if c != NO_CODE]
    assert gen_slots == inputs[1], "the dropped image's VQ slot stays <pad>, the other is filled"
    assert sample.input_ids.count(s.image) == 2 * N, "SigLIP slots are kept"
    with pytest.raises(ValueError, match="text-to-image samples only"):
        builder.training_sample("x", codes(0), inputs, MaskDecision(drop_text=True))


def test_mask_draws_are_seeded_per_sample_and_epoch():
    draw = lambda i, epoch=0, seed=0: draw_mask_decision(f"id-{i}", epoch, seed, "t2i", 0, 0.1, 0.5)  # noqa: E731
    first = [draw(i).drop_text for i in range(4000)]
    assert first == [draw(i).drop_text for i in range(4000)]
    assert list(reversed(first)) == [draw(i).drop_text for i in reversed(range(4000))]
    assert 0.08 < sum(first) / 4000 < 0.12
    assert first != [draw(i, epoch=1).drop_text for i in range(4000)]
    assert first != [draw(i, seed=1).drop_text for i in range(4000)]
    images = [draw_mask_decision(f"id-{i}", 0, 0, "ti2i", 2, 0.1, 0.5).drop_images for i in range(2000)]
    assert all(len(d) == 2 for d in images)
    assert 0.45 < sum(sum(d) for d in images) / 4000 < 0.55
    never = draw_mask_decision("x", 0, 0, "t2i", 0, 0.0, 0.0)
    assert not never.drop_text


def test_bad_prompts_and_codes(builder):
    with pytest.raises(ValueError, match="empty"):
        builder.training_sample("   ", codes(0))
    with pytest.raises(PromptTooLongError, match="limit of 32"):
        builder.training_sample("red " * 100, codes(0))
    with pytest.raises(ValueError, match="15 codes"):
        builder.training_sample("x", codes(0)[:15])


def test_prompts_are_stripped_as_the_chat_template_strips_them(builder):
    # DeepSeek's sft template strips a message's content: surrounding whitespace is no part of
    # the sample, in training, in CFG rows and in the token count a request is checked against.
    clean = "a red circle"
    for messy in (" a red circle", "a red circle\n", "\t a red circle  \n\n"):
        assert builder.training_sample(messy, codes(0)).input_ids == builder.training_sample(clean, codes(0)).input_ids
        assert builder.prefix(messy, [codes(10)]).input_ids == builder.prefix(clean, [codes(10)]).input_ids
        assert builder.prompt_tokens(messy) == builder.prompt_tokens(clean)
    # Whitespace inside the prompt is the prompt's own.
    assert builder.prompt_tokens("a red\n\ncircle") != builder.prompt_tokens("a red circle")


def test_pad_id_is_the_vocabulary_id_of_the_deepseek_pad_token(bundle):
    from janus_lab.model.tokenizer import PAD_TOKEN, SpecialTokenIds, build_debug_tokenizer

    pad_id = bundle.processor.tokenizer.get_vocab()[PAD_TOKEN]
    assert SpecialTokenIds.from_tokenizer(bundle.processor.tokenizer).pad == pad_id
    # A tokenizer with no pad_token (DeepSeek's processor never reads it) resolves the same id.
    unset = build_debug_tokenizer()
    unset.pad_token = None
    assert SpecialTokenIds.from_tokenizer(unset).pad == pad_id
    # One that pads with another token would silently change CFG's unconditional rows and the
    # text drop: refused, naming both tokens.
    other = build_debug_tokenizer()
    other.pad_token = other.eos_token
    with pytest.raises(ValueError, match=r"pad_token is '<｜end▁of▁sentence｜>' \(id \d+\) but Janus pads with "
                                         r"'<｜▁pad▁｜>' \(id \d+\)"):
        SequenceBuilder(other, N)


def test_cfg_rows(builder):
    s = builder.special
    prefix = builder.prefix("make it blue", [codes(10)])
    uncond = builder.unconditional(prefix)
    assert uncond.input_ids[0] == s.bos and uncond.input_ids[-1] == s.boi
    assert set(uncond.input_ids[1:-1]) == {s.pad} and set(uncond.gen_codes) == {NO_CODE}
    assert uncond.num_input_images == 0
    part = builder.partial(prefix)
    assert part.input_ids == prefix.input_ids and set(part.gen_codes) == {NO_CODE}
    assert part.num_input_images == 1


def _hand_loss(bundle, prompt_ids, input_image, input_codes, target):
    """Loss by explicit concatenation of embeddings, without the objective's masking logic."""
    model = bundle.model
    core = model.model
    s = bundle.special_ids
    embed = core.get_input_embeddings()
    gen = model.prepare_embeddings_for_image_generation
    pieces = [embed(torch.tensor([s.bos])), embed(torch.tensor(prompt_ids[0], dtype=torch.long))]
    if input_image is not None:
        siglip = core.aligner(core.vision_model(input_image[None]).last_hidden_state)[0]
        pieces += [embed(torch.tensor([s.boi])), siglip, embed(torch.tensor([s.eoi, s.boi])),
                   gen(torch.tensor(input_codes)), embed(torch.tensor([s.eoi]))]
    pieces += [embed(torch.tensor(prompt_ids[1], dtype=torch.long)), embed(torch.tensor([s.boi])), gen(torch.tensor(target[:-1]))]
    sequence = torch.cat(pieces)[None]
    hidden = core.language_model(inputs_embeds=sequence).last_hidden_state[0]
    start = sequence.shape[1] - N  # the <boi> position
    logits = core.generation_head(hidden[start:])
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll = -log_probs[torch.arange(N), torch.tensor(target)]
    return nll, logits.argmax(-1)


def test_loss_equals_hand_computation(bundle, builder):
    tok = builder.tokenizer
    user = tok.encode("<|User|>: ", add_special_tokens=False)
    target_a, target_b, inp = codes(0), codes(1), codes(2)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = builder.training_sample("a red circle", target_a)
    b = builder.training_sample("make it blue", target_b, [inp])
    batch = collate_samples([a, b], builder.special.pad, [image])
    objective = GenerationObjective(bundle.model)
    with torch.no_grad():
        out = objective(**batch)
        suffix = lambda p: tok.encode(p + "\n\n<|Assistant|>:", add_special_tokens=False)  # noqa: E731
        nll_a, pred_a = _hand_loss(bundle, (tok.encode("<|User|>: a red circle\n\n<|Assistant|>:",
                                                        add_special_tokens=False), []), None, None, target_a)
        nll_b, pred_b = _hand_loss(bundle, (user, suffix("make it blue")), image, inp, target_b)
    expected = torch.cat([nll_a, nll_b]).mean()
    assert out.num_tokens.item() == 2 * N
    assert abs(out.loss.item() - expected.item()) < 1e-5
    correct = (pred_a == torch.tensor(target_a)).sum() + (pred_b == torch.tensor(target_b)).sum()
    assert out.correct.item() == correct.item()


def test_c0_is_supervised(bundle, builder):
    # The loss is the mean over all N codes, c_0 (predicted at <boi>) included; a loss that
    # shifts once more and skips c_0 would differ.
    target = codes(0)
    batch = collate_samples([builder.training_sample("a red circle", target)], builder.special.pad)
    boi = batch["input_ids"][0].tolist().index(builder.special.boi)
    assert batch["labels"][0, boi].item() == target[0]
    with torch.no_grad():
        out = GenerationObjective(bundle.model)(**batch)
        prompt = builder.tokenizer.encode("<|User|>: a red circle\n\n<|Assistant|>:", add_special_tokens=False)
        nll, _ = _hand_loss(bundle, (prompt, []), None, None, target)
    assert abs(out.loss.item() - nll.mean().item()) < 1e-5
    assert abs(out.loss.item() - nll[1:].mean().item()) > 1e-4


def test_masked_batch_trains(bundle, builder):
    torch.manual_seed(0)
    model = debug(seed=5).model
    objective = GenerationObjective(model)
    samples = [builder.training_sample("a red circle", codes(0)),
               builder.training_sample("a red circle", codes(0), mask=MaskDecision(drop_text=True))]
    batch = collate_samples(samples, builder.special.pad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        out = objective(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert model.model.vqmodel.encoder.conv_in.weight.grad is None
