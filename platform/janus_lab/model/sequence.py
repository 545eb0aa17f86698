"""Sequence layout, masking and batching for generation training (docs/design.md, "Sequence layout", "Masking").

One sample becomes three aligned id lists:
- `input_ids`: text tokens; `<img>` at SigLIP slots; `<pad>` at VQ slots and target codes;
- `gen_codes`: the VQ code whose generation embedding replaces the token embedding, -1 elsewhere;
- `labels`: the target code predicted from that position, -100 elsewhere.

Text-to-image:   BOS "<|User|>: " prompt "\\n\\n<|Assistant|>:" <boi> c_0 .. c_{N-2}
Editing adds, per input image, after "<|User|>: ":
                 <boi> <img>xN <eoi> <boi> <pad>xN <eoi>
The hidden state at <boi> predicts c_0 and the one at c_i predicts c_{i+1}, so all N codes are
supervised and c_{N-1} never needs to be an input.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from janus_lab.model.tokenizer import SpecialTokenIds

IGNORE_INDEX = -100
NO_CODE = -1
USER_PREFIX = "<|User|>: "
ASSISTANT_SUFFIX = "\n\n<|Assistant|>:"


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the configured limit."""


@dataclass
class TokenizedSample:
    """One sample in the sequence layout, before batching."""

    input_ids: list[int]
    gen_codes: list[int]
    labels: list[int]
    num_input_images: int = 0
    """Number of SigLIP image slots (their pixels travel beside the sample)."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class MaskDecision:
    """What masking does to one sample in one epoch (docs/design.md, "Masking")."""

    drop_text: bool = False
    """T2I: every token between BOS and the final <boi> becomes <pad>."""
    drop_images: tuple[bool, ...] = field(default_factory=tuple)
    """TI2I, per input image: leave its VQ slot as <pad> (the SigLIP slot is kept)."""


def draw_mask_decision(sample_id: str, epoch: int, seed: int, task: str, num_input_images: int,
                       t2i_text_drop: float, ti2i_image_drop: float) -> MaskDecision:
    """Draws the masking of one sample for one epoch.

    The generator is seeded from (seed, epoch, sample id), so the draw does not depend on the
    order samples arrive in, on which worker reads them, or on whether the run was resumed.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    if task == "t2i":
        return MaskDecision(drop_text=rng.random() < t2i_text_drop)
    if task == "ti2i":
        return MaskDecision(drop_images=tuple(rng.random() < ti2i_image_drop for _ in range(num_input_images)))
    raise ValueError(f"unknown task {task!r}; expected 't2i' or 'ti2i'")


class SequenceBuilder:
    """Builds token sequences in the Janus generation layout for one tokenizer.

    Args:
        tokenizer: a tokenizer with the Janus special tokens.
        num_image_tokens: N, codes per image.
        max_text_tokens: longest prompt accepted, in tokens (None: no limit).
    """

    def __init__(self, tokenizer, num_image_tokens: int, max_text_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.special = SpecialTokenIds.from_tokenizer(tokenizer)
        self.num_image_tokens = num_image_tokens
        self.max_text_tokens = max_text_tokens
        self._user_prefix = self._encode(USER_PREFIX)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _checked_prompt(self, prompt: str) -> tuple[str, list[int]]:
        """The prompt as the template holds it, and its tokens.

        Every prompt enters the sequence through here. It is stripped, as DeepSeek's chat
        template strips a message's content, so " a cat\n" and "a cat" are the same sample.

        Raises:
            ValueError: empty prompt.
            PromptTooLongError: more tokens than `max_text_tokens`.
        """
        text = prompt.strip() if prompt else ""
        if not text:
            raise ValueError("prompt is empty")
        ids = self._encode(text)
        if self.max_text_tokens is not None and len(ids) > self.max_text_tokens:
            raise PromptTooLongError(f"prompt has {len(ids)} tokens, more than the limit of {self.max_text_tokens}")
        return text, ids

    def prompt_tokens(self, prompt: str) -> list[int]:
        """Tokenises a prompt (stripped) with the assistant suffix, checking it is usable.

        Raises:
            ValueError: empty prompt.
            PromptTooLongError: more tokens than `max_text_tokens`.
        """
        return self._checked_prompt(prompt)[1] + self._encode(ASSISTANT_SUFFIX)

    def _user_prefix_and(self, prompt: str) -> list[int]:
        text, _ = self._checked_prompt(prompt)
        return self._encode(USER_PREFIX + text + ASSISTANT_SUFFIX)

    def _check_codes(self, codes: Sequence[int], what: str) -> list[int]:
        codes = [int(c) for c in codes]
        if len(codes) != self.num_image_tokens:
            raise ValueError(f"{what} has {len(codes)} codes; the model uses {self.num_image_tokens} per image")
        return codes

    def prefix(self, prompt: str, input_codes: Sequence[Sequence[int]] = (),
               drop_images: Sequence[bool] = ()) -> TokenizedSample:
        """The conditioning part, ending with the final <boi>: what generation starts from.

        Args:
            prompt: the instruction.
            input_codes: VQ codes of each input image (editing); empty for text-to-image.
            drop_images: per input image, leave its VQ slot as <pad>.
        """
        s, n = self.special, self.num_image_tokens
        drop_images = tuple(drop_images) or (False,) * len(input_codes)
        if len(drop_images) != len(input_codes):
            raise ValueError(f"{len(drop_images)} drop flags for {len(input_codes)} input images")
        if not input_codes:
            # One string, tokenised whole, as the chat template produces it.
            text = self._user_prefix_and(prompt)
            ids = [s.bos, *text, s.boi]
            return TokenizedSample(ids, [NO_CODE] * len(ids), [IGNORE_INDEX] * len(ids))
        ids = [s.bos, *self._user_prefix]
        codes = [NO_CODE] * len(ids)
        for k, (image_codes, drop) in enumerate(zip(input_codes, drop_images)):
            image_codes = self._check_codes(image_codes, f"input image {k}")
            ids += [s.boi, *([s.image] * n), s.eoi, s.boi, *([s.pad] * n), s.eoi]
            codes += [NO_CODE] * (n + 3) + ([NO_CODE] * n if drop else image_codes) + [NO_CODE]
        text = self.prompt_tokens(prompt)
        ids += [*text, s.boi]
        codes += [NO_CODE] * (len(text) + 1)
        return TokenizedSample(ids, codes, [IGNORE_INDEX] * len(ids), num_input_images=len(input_codes))

    def training_sample(self, prompt: str, output_codes: Sequence[int],
                        input_codes: Sequence[Sequence[int]] = (),
                        mask: MaskDecision = MaskDecision()) -> TokenizedSample:
        """A full training sample: prefix, then the target codes as inputs and labels."""
        sample = self.prefix(prompt, input_codes, mask.drop_images)
        if mask.drop_text:
            if input_codes:
                raise ValueError("text drop applies to text-to-image samples only")
            sample = self.unconditional(sample)
        target = self._check_codes(output_codes, "output image")
        sample.input_ids += [self.special.pad] * (len(target) - 1)
        sample.gen_codes += target[:-1]
        # The <boi> position (the prefix's last) predicts c_0; the input c_i predicts c_{i+1}.
        sample.labels = sample.labels[:-1] + target
        return sample

    def unconditional(self, sample: TokenizedSample) -> TokenizedSample:
        """Everything between BOS and the final <boi> becomes <pad> (text drop and CFG's
        unconditional row). Works on a prefix or on a full sample."""
        boi = _last_index(sample.input_ids, self.special.boi, before=_first_target(sample))
        ids = list(sample.input_ids)
        codes = list(sample.gen_codes)
        ids[1:boi] = [self.special.pad] * (boi - 1)
        codes[1:boi] = [NO_CODE] * (boi - 1)
        return TokenizedSample(ids, codes, list(sample.labels), num_input_images=0)

    def partial(self, sample: TokenizedSample) -> TokenizedSample:
        """CFG's partial row for editing: SigLIP slots kept, every VQ slot left as <pad>."""
        boi = _last_index(sample.input_ids, self.special.boi, before=_first_target(sample))
        codes = [NO_CODE if i < boi else c for i, c in enumerate(sample.gen_codes)]
        return TokenizedSample(list(sample.input_ids), codes, list(sample.labels), sample.num_input_images)


def _first_target(sample: TokenizedSample) -> int:
    for i, label in enumerate(sample.labels):
        if label != IGNORE_INDEX:
            return i + 1
    return len(sample.input_ids)


def _last_index(ids: Sequence[int], value: int, before: int) -> int:
    for i in range(min(before, len(ids)) - 1, -1, -1):
        if ids[i] == value:
            return i
    raise ValueError("sequence has no <boi> token")


def collate_samples(samples: Sequence[TokenizedSample], pad_id: int,
                    input_pixels: Sequence[torch.Tensor] = (), pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pads samples into one training batch.

    Args:
        samples: tokenised samples.
        pad_id: the tokenizer's pad id.
        input_pixels: SigLIP inputs, (3, H, W) each, in the order their `<img>` slots appear
            across the batch.
        pad_to_multiple_of: round the length up (keeps shapes few for compiled kernels).

    Returns:
        input_ids, attention_mask, gen_codes, labels of shape (B, L), and pixel_values
        (M, 3, H, W) when the batch has input images.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    expected = sum(s.num_input_images for s in samples)
    if expected != len(input_pixels):
        raise ValueError(f"batch has {expected} SigLIP slots but {len(input_pixels)} input images")
    length = max(len(s) for s in samples)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    attention = np.zeros((batch, length), dtype=np.int64)
    gen_codes = np.full((batch, length), NO_CODE, dtype=np.int64)
    labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    for row, s in enumerate(samples):
        n = len(s)
        input_ids[row, :n] = s.input_ids
        attention[row, :n] = 1
        gen_codes[row, :n] = s.gen_codes
        labels[row, :n] = s.labels
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "gen_codes": torch.from_numpy(gen_codes),
        "labels": torch.from_numpy(labels),
    }
    if input_pixels:
        out["pixel_values"] = torch.stack(list(input_pixels))
    return out
