"""Image generation: the batched CFG engine, its request types and checks, and sampling."""

from janus_lab.generation.engine import CfgBatch, GenerationEngine
from janus_lab.generation.requests import (
    GenerationLimits,
    GenerationRequest,
    GenerationRequestError,
    GenerationResult,
    PreparedRequest,
    open_input_image,
    validate_batch,
    validate_request,
)
from janus_lab.generation.sampling import (
    GuidedSampler,
    draw_uniforms,
    filter_top_k,
    filter_top_p,
    image_seed,
    mix_guidance,
    sample_from_logits,
)

__all__ = [
    "CfgBatch", "GenerationEngine",
    "GenerationLimits", "GenerationRequest", "GenerationRequestError", "GenerationResult", "PreparedRequest",
    "open_input_image", "validate_batch", "validate_request",
    "GuidedSampler", "draw_uniforms", "filter_top_k", "filter_top_p", "image_seed", "mix_guidance",
    "sample_from_logits",
]
