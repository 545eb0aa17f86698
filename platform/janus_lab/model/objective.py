"""The generation objective: inputs embeddings, the language model, the generation head, loss.

`GenerationObjective` is the module training wraps: the whole loss is computed inside its
`forward`, because FSDP gathers a sharded module's parameters only around that module's own
forward call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import JanusForConditionalGeneration

from janus_lab.model.sequence import IGNORE_INDEX


def cache_kwarg(language_model: nn.Module) -> str:
    """The keyword a language model's forward takes its KV cache by.

    transformers renamed `past_key_values` to `cache` (5.24 takes both and warns on the old
    name, which goes in 5.40); earlier 5.x releases know only `past_key_values`.
    """
    parameters = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def embed_inputs(model: JanusForConditionalGeneration, input_ids: torch.Tensor, gen_codes: torch.Tensor,
                 pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Builds the language model's input embeddings for a batch in the generation layout.

    Text tokens take the token embedding, `<img>` slots the SigLIP features (through the
    understanding aligner), and positions with a code the generation embedding of that code
    (codebook -> generation aligner).

    Args:
        model: the Janus model.
        input_ids: (B, L) token ids.
        gen_codes: (B, L) VQ codes, -1 where a position is not a generation slot.
        pixel_values: (M, 3, H, W) SigLIP inputs, one per run of `<img>` slots in reading order.

    Returns:
        (B, L, D) embeddings.
    """
    core = model.model
    embeds = core.get_input_embeddings()(input_ids)
    image_slots = input_ids == model.config.image_token_id
    if pixel_values is not None and pixel_values.numel():
        features = core.get_image_features(pixel_values.to(embeds.dtype), return_dict=True).pooler_output
        if features.shape[0] * features.shape[1] != int(image_slots.sum()):
            raise ValueError(
                f"{features.shape[0]} input images give {features.shape[0] * features.shape[1]} features "
                f"for {int(image_slots.sum())} <img> slots"
            )
        embeds = embeds.masked_scatter(image_slots.unsqueeze(-1), features.to(embeds.dtype))
    elif bool(image_slots.any()):
        raise ValueError("the batch has <img> slots but no pixel_values")
    gen_slots = gen_codes >= 0
    if bool(gen_slots.any()):
        gen_embeds = model.prepare_embeddings_for_image_generation(gen_codes[gen_slots])
        embeds = embeds.masked_scatter(gen_slots.unsqueeze(-1), gen_embeds.to(embeds.dtype))
    return embeds


@dataclass
class ObjectiveOutput:
    """Loss and metrics of one micro-batch."""

    loss: torch.Tensor
    """Mean cross-entropy over every supervised code in the batch."""
    correct: torch.Tensor
    """Number of codes the generation head's argmax got right."""
    num_tokens: torch.Tensor
    """Number of supervised codes."""
    nll_per_sample: torch.Tensor
    """(B,) summed negative log-likelihood of each sample's codes (for per-task metrics)."""
    correct_per_sample: torch.Tensor
    """(B,) codes predicted right in each sample."""
    tokens_per_sample: torch.Tensor
    """(B,) supervised codes in each sample."""

    @property
    def accuracy(self) -> torch.Tensor:
        """Token accuracy of the generation head."""
        return self.correct.float() / self.num_tokens.clamp(min=1).float()


class GenerationObjective(nn.Module):
    """Wraps a Janus model; `forward(batch)` returns the image-generation loss.

    Cross-entropy of the generation head over all N target codes of every sample (docs/design.md, "Loss"):
    the hidden state at `<boi>` predicts c_0 and the one at c_i predicts c_{i+1}.
    """

    def __init__(self, model: JanusForConditionalGeneration):
        super().__init__()
        self.model = model

    def _vision_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.model.vision_model.parameters())

    def _idle_vision_output(self, like: torch.Tensor) -> torch.Tensor:
        """Runs the understanding encoder on one blank image, for batches without input images.

        Data-parallel training reduces gradients per group of parameters and expects every
        rank to produce the same set; a text-only batch on one rank beside an editing batch on
        another would not. Adding zero times this output keeps the vision parameters in every
        backward at the cost of one small encoder pass.
        """
        side = self.model.config.vision_config.image_size
        blank = torch.zeros(1, 3, side, side, device=like.device, dtype=like.dtype)
        return self.model.model.get_image_features(blank, return_dict=True).pooler_output.sum()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_codes: torch.Tensor,
                labels: torch.Tensor, pixel_values: torch.Tensor | None = None) -> ObjectiveOutput:
        core = self.model.model
        embeds = embed_inputs(self.model, input_ids, gen_codes, pixel_values)
        hidden = core.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state
        supervised = labels != IGNORE_INDEX
        targets = labels[supervised]
        # Only supervised positions go through the 16384-way head: most of an editing
        # sequence is conditioning.
        logits = core.generation_head(hidden[supervised]).float()
        token_nll = F.cross_entropy(logits, targets, reduction="none")
        loss = token_nll.mean()
        if pixel_values is None and self.training and self._vision_trainable():
            loss = loss + 0.0 * self._idle_vision_output(embeds)
        with torch.no_grad():
            hits = logits.argmax(dim=-1) == targets
            rows = supervised.nonzero()[:, 0]
            batch = labels.shape[0]
            per_sample = lambda values: torch.zeros(batch, device=labels.device).index_add_(  # noqa: E731
                0, rows, values.float())
        return ObjectiveOutput(
            loss=loss, correct=hits.sum(), num_tokens=torch.tensor(targets.numel()),
            nll_per_sample=per_sample(token_nll.detach()), correct_per_sample=per_sample(hits),
            tokens_per_sample=per_sample(torch.ones_like(token_nll)),
        )
