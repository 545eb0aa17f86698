"""Generation requests, their limits, and the checks every request passes before any compute.

The same checks back the CLI, evaluation and the HTTP server (whose 4xx answers carry the
message): a bad request is refused with a `GenerationRequestError` naming the field, before a
single model call, and a batch is refused whole when any of its requests is bad.
"""

from __future__ import annotations

import dataclasses
import io
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from janus_lab.model.sequence import PromptTooLongError, SequenceBuilder
from janus_lab.settings import SamplingSettings, SettingError

SEED_LIMIT = 2**63
"""Seeds are non-negative and below this (torch generators take 64-bit seeds)."""


class GenerationRequestError(ValueError):
    """A request (or a batch of them) that cannot be generated; the message names the field.

    Attributes:
        field: the offending field as a dotted path, e.g. `requests[2].top_p`; the HTTP server
            returns it with a 4xx.
        reason: what is wrong with it.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def within(self, prefix: str) -> "GenerationRequestError":
        """The same error with the field placed under `prefix` (e.g. `requests[2]`)."""
        return GenerationRequestError(f"{prefix}.{self.field}", self.reason)


@dataclass(frozen=True)
class GenerationLimits:
    """What one engine call accepts; larger requests are refused, never truncated."""

    max_text_tokens: int = 256
    """Longest prompt in tokens (the chat template around it not counted)."""
    max_parallel_size: int = 16
    """Most images generated for one request."""
    max_batch_images: int = 64
    """Most images (parallel_size summed over requests) in one engine call."""
    max_input_images: int = 4
    """Most input images of one editing request."""
    max_input_pixels: int = 4096 * 4096
    """Largest input image, in pixels, checked from the header before the image is decoded."""

    def __post_init__(self) -> None:
        for name in ("max_text_tokens", "max_parallel_size", "max_batch_images", "max_input_images",
                     "max_input_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class GenerationRequest(SamplingSettings):
    """One prompt (plus input images for editing) and how to sample from it (the fields of
    `SamplingSettings`: cfg_weight, cfg_weight2, temperature, top_k, top_p).

    Without input images the request is text-to-image; with K >= 1 it is editing
    (text-and-image-to-image), and the images come before the prompt in the sequence. How the
    fields are used: docs/design.md, "Classifier-free guidance".
    """

    prompt: str
    """The instruction or description."""
    input_images: Sequence[Image.Image | bytes] = ()
    """Editing inputs: PIL images or encoded image bytes (PNG, JPEG, ...); empty for text-to-image."""
    parallel_size: int = 1
    """Images generated for this prompt."""
    seed: int | None = None
    """Fixes the result whatever else shares the batch; None: a random seed, returned with the result."""

    def __post_init__(self) -> None:
        # Built from whatever a client sent: `validate_request` checks it and answers with the
        # field's name, so construction accepts anything.
        pass

    @property
    def task(self) -> str:
        """`"t2i"` or `"ti2i"`, from whether the request has input images."""
        return "ti2i" if len(self.input_images) else "t2i"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> "GenerationRequest":
        """Builds a request from a JSON object (a JSONL line, an HTTP body).

        Args:
            data: field name -> value; `input_images` must already be images or bytes.
            defaults: values for fields `data` leaves out (e.g. the CLI's sampling settings).

        Raises:
            GenerationRequestError: an unknown key, or no prompt.
        """
        if not isinstance(data, Mapping):
            raise GenerationRequestError("request", f"must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise GenerationRequestError(str(key), f"unknown field; valid fields: {', '.join(names)}")
        if "prompt" not in data:
            raise GenerationRequestError("prompt", "is missing")
        values = {**(defaults or {}), **data}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class PreparedRequest:
    """A request that passed every check: images opened, seed fixed. What the engine runs."""

    request: GenerationRequest
    images: list[Image.Image] = field(default_factory=list)
    """Input images, decoded, RGB."""
    seed: int = 0
    """The request's seed, drawn at random when it had none."""
    prefix_length: int = 0
    """Tokens in the conditioning sequence (up to and including the final <boi>)."""


@dataclass
class GenerationResult:
    """What one request produced."""

    codes: torch.Tensor
    """(parallel_size, N) int64 VQ codes in raster order, on the CPU."""
    images: list[Image.Image]
    """The decoded images (empty when decoding was not asked for)."""
    seed: int
    """The seed that reproduces this result."""
    cancelled: bool = False
    """Its watcher left mid-batch: the codes stop where its rows left the batch, no images."""


def open_input_image(value: Any, max_pixels: int, field_name: str) -> Image.Image:
    """Opens one input image, checking its size from the header before decoding it.

    Args:
        value: a PIL image or encoded image bytes.
        max_pixels: largest accepted width x height.
        field_name: how errors name the value, e.g. `input_images[0]`.

    Returns:
        The image, decoded, in RGB.

    Raises:
        GenerationRequestError: not an image, unreadable bytes, or too many pixels.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            # PIL reads only the header here: the pixel count is checked before the (possibly
            # huge) image is decoded. Its own bomb warning is made an error for the same reason.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(value)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise GenerationRequestError(field_name, f"claims too many pixels ({err})") from None
        except Exception as err:  # noqa: BLE001 - whatever the decoder raises, it is bad input
            raise GenerationRequestError(field_name, f"is not an image PIL can read ({err})") from None
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise GenerationRequestError(field_name, f"must be a PIL image or image bytes, got {type(value).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise GenerationRequestError(field_name, f"has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise GenerationRequestError(
            field_name, f"has {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
    try:
        return image.convert("RGB")  # decodes: truncated or corrupt data fails here
    except Exception as err:  # noqa: BLE001
        raise GenerationRequestError(field_name, f"could not be decoded ({err})") from None


def _check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise GenerationRequestError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise GenerationRequestError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise GenerationRequestError(name, f"must be <= {maximum} (the configured limit), got {value}")


def check_sampling(request: GenerationRequest, limits: GenerationLimits) -> None:
    """Checks every numeric field of a request (no tokenizer, no images needed).

    Raises:
        GenerationRequestError: naming the first bad field.
    """
    _check_int(request.parallel_size, "parallel_size", 1, limits.max_parallel_size)
    try:
        request.check_sampling()
    except SettingError as err:
        raise GenerationRequestError(err.field, err.reason) from None
    if request.seed is not None:
        _check_int(request.seed, "seed", 0, SEED_LIMIT - 1)


def validate_request(request: GenerationRequest, limits: GenerationLimits, builder: SequenceBuilder,
                     max_sequence_length: int | None = None) -> PreparedRequest:
    """Checks one request and opens its images; nothing runs on the model.

    Args:
        request: the request.
        limits: the configured limits.
        builder: the model's sequence builder (tokenises the prompt to count its tokens).
        max_sequence_length: the model's context (max positions); conditioning plus N codes
            must fit in it.

    Returns:
        The prepared request (images decoded, seed drawn if it had none).

    Raises:
        GenerationRequestError: naming the first bad field.
    """
    if not isinstance(request, GenerationRequest):
        raise GenerationRequestError("request", f"must be a GenerationRequest, got {type(request).__name__}")
    if not isinstance(request.prompt, str):
        raise GenerationRequestError("prompt", f"must be a string, got {type(request.prompt).__name__}")
    if not request.prompt.strip():
        raise GenerationRequestError("prompt", "is empty")
    check_sampling(request, limits)
    if isinstance(request.input_images, (str, bytes, Image.Image)) or not isinstance(request.input_images, Sequence):
        raise GenerationRequestError("input_images", "must be a list of images")
    if len(request.input_images) > limits.max_input_images:
        raise GenerationRequestError(
            "input_images", f"has {len(request.input_images)} images, more than the limit of {limits.max_input_images}")
    try:
        builder.prompt_tokens(request.prompt)
    except PromptTooLongError as err:
        raise GenerationRequestError("prompt", str(err)) from None
    except ValueError as err:
        raise GenerationRequestError("prompt", str(err)) from None
    images = [open_input_image(value, limits.max_input_pixels, f"input_images[{k}]")
              for k, value in enumerate(request.input_images)]
    # The prefix length does not depend on the code values: count it with placeholder codes.
    placeholder = [[0] * builder.num_image_tokens] * len(images)
    prefix_length = len(builder.prefix(request.prompt, input_codes=placeholder))
    if max_sequence_length is not None and prefix_length + builder.num_image_tokens > max_sequence_length:
        raise GenerationRequestError(
            "prompt", f"the sequence ({prefix_length} conditioning tokens + {builder.num_image_tokens} codes) "
                      f"exceeds the model's context of {max_sequence_length} positions")
    seed = request.seed if request.seed is not None else secrets.randbelow(SEED_LIMIT)
    return PreparedRequest(request=request, images=images, seed=seed, prefix_length=prefix_length)


def validate_batch(requests: Sequence[GenerationRequest], limits: GenerationLimits, builder: SequenceBuilder,
                   max_sequence_length: int | None = None, *, check_batch_size: bool = True) -> list[PreparedRequest]:
    """Checks a whole batch before any of it runs.

    Args:
        requests: the batch.
        limits: the configured limits.
        builder: the model's sequence builder.
        max_sequence_length: the model's context, in positions.
        check_batch_size: refuse more than `limits.max_batch_images` images in total (off when
            the caller splits the requests into batches itself).

    Raises:
        GenerationRequestError: an empty batch, too many images in total, or a bad request
            (its field prefixed with `requests[i].`).
    """
    if isinstance(requests, GenerationRequest) or not isinstance(requests, Sequence):
        raise GenerationRequestError("requests", "must be a list of GenerationRequest")
    if not requests:
        raise GenerationRequestError("requests", "is empty")
    prepared = []
    for index, request in enumerate(requests):
        try:
            prepared.append(validate_request(request, limits, builder, max_sequence_length))
        except GenerationRequestError as err:
            raise err.within(f"requests[{index}]") from None
    total = sum(p.request.parallel_size for p in prepared)
    if check_batch_size and total > limits.max_batch_images:
        raise GenerationRequestError(
            "requests", f"ask for {total} images in total, more than the batch limit of {limits.max_batch_images}")
    return prepared
