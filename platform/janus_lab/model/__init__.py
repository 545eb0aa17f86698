"""The Janus model core: builders, weights I/O, VQ codes, sequence layout and the objective."""

from janus_lab.model.builders import PRESETS, JanusBundle, debug, janus_pro_1b, janus_pro_7b
from janus_lab.model.objective import GenerationObjective, ObjectiveOutput, cache_kwarg, embed_inputs
from janus_lab.model.sequence import (
    MaskDecision,
    SequenceBuilder,
    TokenizedSample,
    collate_samples,
    draw_mask_decision,
)
from janus_lab.model.tokenizer import SpecialTokenIds
from janus_lab.model.vq import decode_vq_codes, encode_vq_codes, image_to_tensor, tensor_to_images

__all__ = [
    "PRESETS", "JanusBundle", "debug", "janus_pro_1b", "janus_pro_7b",
    "GenerationObjective", "ObjectiveOutput", "cache_kwarg", "embed_inputs",
    "MaskDecision", "SequenceBuilder", "TokenizedSample", "collate_samples", "draw_mask_decision",
    "SpecialTokenIds", "decode_vq_codes", "encode_vq_codes", "image_to_tensor", "tensor_to_images",
]
