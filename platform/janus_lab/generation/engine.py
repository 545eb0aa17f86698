"""The batched generation engine: text-to-image and editing with classifier-free guidance.

One call runs many requests of mixed tasks and prompt lengths as one CFG batch
(docs/design.md, "Classifier-free guidance"):

- every image gets its CFG rows: text-to-image 2 (cond, uncond), editing 3 (full, part, uncond);
- the rows of one request are the same for all its `parallel_size` images, so only the distinct
  rows are embedded and prefilled, and the KV cache is then copied out to every image's rows;
- rows of different lengths are LEFT-padded, so every row's last position is its final <boi>;
  the attention mask hides the padding and position ids count real tokens only, so a row sees
  exactly what it would see alone;
- each of the N steps feeds the sampled code's generation embedding to every row of its image.

On CUDA the engine decodes on a static KV cache by default, and `compile_step=True` compiles
the per-token step with `torch.compile(mode="reduce-overhead")` (CUDA graphs); on the CPU the
eager dynamic-cache path is the default. One engine runs one batch at a time (a static cache is
reused between calls): a server serialises calls to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from transformers import DynamicCache, JanusForConditionalGeneration, StaticCache
from transformers.cache_utils import DynamicLayer

from janus_lab.generation.progress import PARTIAL_FILL, RequestProgress, fill_unfinished
from janus_lab.generation.requests import (
    GenerationLimits,
    GenerationRequest,
    GenerationRequestError,
    GenerationResult,
    PreparedRequest,
    validate_batch,
    validate_request,
)
from janus_lab.generation.sampling import GuidedSampler, ImageSampling
from janus_lab.model.builders import JanusBundle
from janus_lab.model.objective import cache_kwarg, embed_inputs
from janus_lab.model.sequence import NO_CODE, SequenceBuilder, TokenizedSample
from janus_lab.model.vq import decode_vq_codes, encode_vq_codes, image_to_tensor, tensor_to_images

# Static-cache shapes are rounded up so that batches of similar size reuse one cache (and one
# captured CUDA graph) instead of compiling a new one per call.
ROW_BUCKET = 4
LENGTH_BUCKET = 128
LENGTH_GROUP_SLACK = 64
"""Tokens a prefix may exceed twice its group's shortest by before it starts a new group."""
LENGTH_GROUP_MIN_PADDING = 32 * 1024
"""Padded row-tokens a separate batch must spare to be worth its own decode loop (CPU, measured)."""


@dataclass
class CfgBatch:
    """Everything the decode loop needs, built from prepared requests before any LM call."""

    prefill_embeds: torch.Tensor
    """(P, L, D) input embeddings of the distinct rows, left-padded."""
    prefill_mask: torch.Tensor
    """(P, L) 1 for real tokens, 0 for padding."""
    prefill_positions: torch.Tensor
    """(P, L) position ids counting real tokens only."""
    row_source: torch.Tensor
    """(R,) the distinct row each generation row starts from."""
    row_image: torch.Tensor
    """(R,) the image each generation row belongs to."""
    row_length: torch.Tensor
    """(R,) real tokens of each generation row's prefix (its next position id)."""
    sampler: GuidedSampler
    """Mixes each image's rows and picks its next code."""
    request_images: list[range]
    """Per request, which images are its own."""

    @property
    def num_rows(self) -> int:
        """R, CFG rows of the decode loop."""
        return int(self.row_source.numel())

    @property
    def prefix_length(self) -> int:
        """L, the padded prefix length."""
        return int(self.prefill_mask.shape[1])


class GenerationEngine:
    """Generates images for batches of requests with one Janus model.

    Args:
        model: the Janus model (put in eval mode while it generates, then back as it was, so
            a training loop can generate mid-run).
        tokenizer: its tokenizer, with the Janus special tokens.
        image_size: side of the images the model reads and writes.
        num_image_tokens: N, codes per image.
        limits: what one call accepts.
        static_cache: decode on a preallocated static KV cache; None: only on CUDA.
        compile_step: compile the per-token step with `torch.compile(mode="reduce-overhead")`
            (needs the static cache; meant for CUDA, where it captures CUDA graphs).
        length_groups: decode requests of very different prefix lengths as separate batches
            (`length_groups`); off, one batch pads everything to the longest (benchmarks).
        share_unconditional: requests of one prefix length share one prefilled unconditional
            row; off, every request prefills its own (benchmarks).
    """

    def __init__(self, model: JanusForConditionalGeneration, tokenizer, *, image_size: int, num_image_tokens: int,
                 limits: GenerationLimits = GenerationLimits(), static_cache: bool | None = None,
                 compile_step: bool = False, length_groups: bool = True, share_unconditional: bool = True):
        self.model = model
        self.limits = limits
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.builder = SequenceBuilder(tokenizer, num_image_tokens, max_text_tokens=limits.max_text_tokens)
        self.device = next(model.parameters()).device
        self.static_cache = self.device.type == "cuda" if static_cache is None else static_cache
        if compile_step and not self.static_cache:
            raise ValueError("compile_step needs static_cache: a growing cache changes shapes every step")
        self.compile_step = compile_step
        self.group_by_length = length_groups
        self.share_unconditional = share_unconditional
        self.max_sequence_length = int(model.config.text_config.max_position_embeddings)
        self._cache_kwarg = cache_kwarg(model.model.language_model)
        self._step = torch.compile(self._decode_step, mode="reduce-overhead", dynamic=False) \
            if compile_step else self._decode_step
        self._cache_key: tuple | None = None
        self._cache: StaticCache | None = None

    @classmethod
    def from_bundle(cls, bundle: JanusBundle, **kwargs) -> "GenerationEngine":
        """An engine for a model bundle (`janus_lab.model.debug()`, `load_pretrained(...)`)."""
        return cls(bundle.model, bundle.processor.tokenizer, image_size=bundle.image_size,
                   num_image_tokens=bundle.num_image_tokens, **kwargs)

    # ------------------------------------------------------------------ public API

    def validate(self, requests: Sequence[GenerationRequest]) -> list[PreparedRequest]:
        """Checks a batch against the limits and the model's context; no model compute.

        Raises:
            GenerationRequestError: naming the first bad field (`requests[i].field`).
        """
        return validate_batch(requests, self.limits, self.builder, self.max_sequence_length)

    def generate(self, requests: Sequence[GenerationRequest], *, decode_images: bool = True) -> list[GenerationResult]:
        """Validates a batch of requests, then generates all of them together.

        Args:
            requests: text-to-image and editing requests, in any mix.
            decode_images: also decode the codes to PIL images.

        Returns:
            One result per request, in order.

        Raises:
            GenerationRequestError: a bad request; nothing was computed.
        """
        return self.generate_prepared(self.validate(requests), decode_images=decode_images)

    @torch.inference_mode()
    def generate_prepared(self, prepared: Sequence[PreparedRequest], *, decode_images: bool = True,
                          progress: Sequence[RequestProgress | None] | None = None) -> list[GenerationResult]:
        """Generates requests that already passed `validate` (a server validates on arrival).

        Args:
            prepared: the requests.
            decode_images: also decode the codes to PIL images.
            progress: per request, what its watcher asks for (partial images, leaving early) or
                None (janus_lab.generation.progress).

        Returns:
            One result per request, in order; a request whose watcher left is `cancelled`.
        """
        progress = list(progress or [None] * len(prepared))
        # Every module's own mode is restored (not model.train(), which would also flip the
        # frozen VQ tokenizer into training mode).
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        results: list[GenerationResult | None] = [None] * len(prepared)
        try:
            for group in self.length_groups(prepared):
                batch = self.build_cfg_batch([prepared[i] for i in group])
                codes, cancelled = self._decode(batch, [progress[i] for i in group])
                codes = codes.cpu()
                for g, (i, images) in enumerate(zip(group, batch.request_images)):
                    item, request_codes = prepared[i], codes[images.start:images.stop]
                    if g in cancelled:
                        results[i] = GenerationResult(codes=request_codes, images=[], seed=item.seed, cancelled=True)
                        continue
                    pictures = tensor_to_images(decode_vq_codes(self.model, request_codes)) if decode_images else []
                    results[i] = GenerationResult(codes=request_codes, images=pictures, seed=item.seed)
        finally:
            for module, training in modes:
                module.training = training
        return results

    def length_groups(self, prepared: Sequence[PreparedRequest]) -> list[list[int]]:
        """Requests split into batches of similar prefix length, each decoded on its own cache.

        One batch is left-padded to its longest prefix, and every step of every row attends over
        that padding. A text-to-image prefix is tens of tokens and an edit's over a thousand (its
        input images' SigLIP and VQ slots), so in one batch the text-to-image rows pay for the
        edits' length at every step; a second batch pays its own per-step overhead instead. A new
        group starts where a prefix is more than twice the group's shortest plus
        LENGTH_GROUP_SLACK tokens, and only when the padding it spares (rows x tokens) is at least
        LENGTH_GROUP_MIN_PADDING: measured on the CPU, splitting lost at 16 rows x ~1,160 padded
        tokens and won at 64 rows (docs/PERFORMANCE.md). The static cache (CUDA graphs) keeps one
        batch: its shapes are what its captured graphs are for.
        """
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].prefix_length)
        if self.static_cache or not self.group_by_length or not order:
            return [list(range(len(prepared)))]
        groups, shortest = [[order[0]]], prepared[order[0]].prefix_length
        for i in order[1:]:
            if prepared[i].prefix_length > 2 * shortest + LENGTH_GROUP_SLACK:
                groups.append([])
                shortest = prepared[i].prefix_length
            groups[-1].append(i)
        merged = [groups[-1]]
        for group in reversed(groups[:-1]):  # from the longest down: is a separate batch worth it?
            rows = sum(prepared[i].request.parallel_size * (3 if prepared[i].images else 2) for i in group)
            longest = max(prepared[i].prefix_length for i in merged[-1])
            spared = sum(prepared[i].request.parallel_size * (3 if prepared[i].images else 2)
                         * (longest - prepared[i].prefix_length) for i in group)
            if rows and spared < LENGTH_GROUP_MIN_PADDING:
                merged[-1] = group + merged[-1]
            else:
                merged.append(group)
        return sorted(sorted(group) for group in merged)

    @torch.inference_mode()
    def decode_partial(self, codes: torch.Tensor, rows: int) -> list[Image.Image]:
        """Images of codes whose first `rows` rows are finished: those rows decoded, the rest grey.

        Only the finished band (and one row past it, the last finished row repeated, so that the
        decoder's convolutions see a plausible neighbour) goes through the VQ decoder: a partial
        image costs (rows + 1) / side of a full decode. Safe to call from another thread while a
        batch generates (it runs the VQ decoder only).
        """
        side = math.isqrt(self.num_image_tokens)
        band = min(rows + 1, side)
        vq = self.model.model.vqmodel
        grid = fill_unfinished(codes, rows).view(len(codes), side, side)[:, :band].to(vq.quantize.embedding.weight.device)
        latent = torch.nn.functional.normalize(vq.quantize.embedding(grid), dim=-1).permute(0, 3, 1, 2)
        pixels = vq.decoder(vq.post_quant_conv(latent.to(vq.post_quant_conv.weight.dtype)))
        top = tensor_to_images(pixels.permute(0, 2, 3, 1))
        images = []
        for image in top:
            canvas = Image.new("RGB", (self.image_size, self.image_size), PARTIAL_FILL)
            canvas.paste(image.crop((0, 0, self.image_size, self.image_size * rows // side)), (0, 0))
            images.append(canvas)
        return images

    def generate_in_batches(self, requests: Sequence[GenerationRequest], *, max_images: int | None = None,
                            decode_images: bool = True,
                            on_refused: Callable[[int, GenerationRequestError], None] | None = None,
                            ) -> Iterator[tuple[int, GenerationResult]]:
        """Generates any number of requests, at most `max_images` images per engine batch.

        Every request is validated here, before this returns. By default a bad one stops the
        whole run before any compute; with `on_refused` (evaluation over a prompt set) it is
        handed there with its error and left out, and the others run. Results do not depend on
        how the requests are split into batches.

        Args:
            requests: the requests.
            max_images: most images per engine batch (at most `limits.max_batch_images`).
            decode_images: also decode the codes to PIL images.
            on_refused: called with (request index, error) for each bad request, before any compute.

        Returns:
            An iterator of (request index, result), in request order, the refused ones left out.

        Raises:
            GenerationRequestError: a bad request (`requests[i].field`) without `on_refused`, or
                an empty list of requests.
        """
        max_images = min(max_images or self.limits.max_batch_images, self.limits.max_batch_images)
        if on_refused is None:
            prepared = validate_batch(requests, self.limits, self.builder, self.max_sequence_length,
                                      check_batch_size=False)
            return self._generate_chunks(list(enumerate(prepared)), max_images, decode_images)
        if isinstance(requests, GenerationRequest) or not isinstance(requests, Sequence) or not requests:
            validate_batch(requests, self.limits, self.builder)  # raises the batch-level error
        accepted = []
        for index, request in enumerate(requests):
            try:
                accepted.append((index, validate_request(request, self.limits, self.builder,
                                                         self.max_sequence_length)))
            except GenerationRequestError as err:
                on_refused(index, err.within(f"requests[{index}]"))
        return self._generate_chunks(accepted, max_images, decode_images)

    def _generate_chunks(self, prepared: list[tuple[int, PreparedRequest]], max_images: int,
                         decode_images: bool) -> Iterator[tuple[int, GenerationResult]]:
        chunk: list[tuple[int, PreparedRequest]] = []
        images = 0
        for index, item in prepared:
            if chunk and images + item.request.parallel_size > max_images:
                yield from self._generate_chunk(chunk, decode_images)
                chunk, images = [], 0
            chunk.append((index, item))
            images += item.request.parallel_size
        if chunk:
            yield from self._generate_chunk(chunk, decode_images)

    def _generate_chunk(self, chunk: list[tuple[int, PreparedRequest]],
                        decode_images: bool) -> Iterator[tuple[int, GenerationResult]]:
        results = self.generate_prepared([item for _, item in chunk], decode_images=decode_images)
        yield from zip((index for index, _ in chunk), results)

    # ------------------------------------------------------------------ batch building

    @torch.inference_mode()
    def build_cfg_batch(self, prepared: Sequence[PreparedRequest]) -> CfgBatch:
        """Lays out the CFG rows of every image of every request and embeds the distinct ones.

        Runs the VQ encoder (input images -> codes) and the embeddings; not the language model.
        """
        side, pad = self.image_size, self.builder.special.pad
        input_pixels = [image_to_tensor(image, side) for item in prepared for image in item.images]
        input_codes = (encode_vq_codes(self.model, torch.stack(input_pixels)).tolist() if input_pixels else [])

        distinct: list[TokenizedSample] = []
        distinct_pixels: list[torch.Tensor] = []
        row_source, row_image, cond_rows, uncond_rows, part_rows = [], [], [], [], []
        images: list[ImageSampling] = []
        request_images: list[range] = []
        shared_uncond: dict[int, int] = {}  # prefix length -> its unconditional row in `distinct`
        next_input = 0
        for item in prepared:
            request, k = item.request, len(item.images)
            codes = input_codes[next_input:next_input + k]
            pixels = input_pixels[next_input:next_input + k]
            next_input += k
            first = self.builder.prefix(request.prompt, input_codes=codes)
            kinds = [first, self.builder.partial(first), self.builder.unconditional(first)] if k else \
                [first, self.builder.unconditional(first)]
            sources = []
            for index, sample in enumerate(kinds):
                # An unconditional row is BOS, <pad> x L, <boi>: it depends on the prefix length
                # only, so every request of that length shares one prefilled row.
                key = len(sample) if index == len(kinds) - 1 and self.share_unconditional else None
                if key is not None and key in shared_uncond:
                    sources.append(shared_uncond[key])
                    continue
                if key is not None:
                    shared_uncond[key] = len(distinct)
                sources.append(len(distinct))
                distinct.append(sample)
                distinct_pixels.extend(pixels[:sample.num_input_images])
            request_images.append(range(len(images), len(images) + request.parallel_size))
            for j in range(request.parallel_size):
                rows = list(range(len(row_source), len(row_source) + len(kinds)))
                row_source.extend(sources)
                row_image.extend([len(images)] * len(kinds))
                cond_rows.append(rows[0])
                uncond_rows.append(rows[-1])
                part_rows.append(rows[1] if k else -1)
                images.append(ImageSampling(**request.sampling_dict(), seed=item.seed, index=j))

        length = max(len(s) for s in distinct)
        ids = torch.full((len(distinct), length), pad, dtype=torch.long)
        gen_codes = torch.full((len(distinct), length), NO_CODE, dtype=torch.long)
        mask = torch.zeros((len(distinct), length), dtype=torch.long)
        for row, sample in enumerate(distinct):
            ids[row, length - len(sample):] = torch.tensor(sample.input_ids)
            gen_codes[row, length - len(sample):] = torch.tensor(sample.gen_codes)
            mask[row, length - len(sample):] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        dtype = self.model.model.get_input_embeddings().weight.dtype
        pixel_values = torch.stack(distinct_pixels).to(self.device, dtype) if distinct_pixels else None
        embeds = embed_inputs(self.model, ids.to(self.device), gen_codes.to(self.device), pixel_values)
        source = torch.tensor(row_source, dtype=torch.long)
        return CfgBatch(
            prefill_embeds=embeds,
            prefill_mask=mask.to(self.device),
            prefill_positions=positions.to(self.device),
            row_source=source.to(self.device),
            row_image=torch.tensor(row_image, dtype=torch.long, device=self.device),
            row_length=mask.sum(dim=-1)[source].to(self.device),
            sampler=GuidedSampler(images, cond_rows, uncond_rows, part_rows, self.num_image_tokens, self.device),
            request_images=request_images,
        )

    # ------------------------------------------------------------------ decoding

    def _decode(self, batch: CfgBatch, progress: list[RequestProgress | None]) -> tuple[torch.Tensor, set[int]]:
        """Prefill + N-1 cached steps.

        Returns:
            (I, N) codes on the model's device, and the requests whose watcher left (their rows
            left the batch at the next step on the growing cache; their codes stop there).
        """
        core = self.model.model
        n = self.num_image_tokens
        prefill_cache = DynamicCache(config=core.language_model.config)
        hidden = core.language_model(inputs_embeds=batch.prefill_embeds, attention_mask=batch.prefill_mask,
                                     position_ids=batch.prefill_positions, use_cache=True,
                                     **{self._cache_kwarg: prefill_cache}).last_hidden_state[:, -1]
        row_logits = core.generation_head(hidden).float().index_select(0, batch.row_source)

        rows, length = batch.num_rows, batch.prefix_length
        if self.static_cache:
            cache, rows, capacity = self._static_cache_from(prefill_cache, batch)
        else:
            # Distinct rows -> every image's rows, into buffers reserved for the whole image.
            cache, capacity = prefill_cache, length + n
            cache.layers = [_ReservedLayer(layer, batch.row_source, capacity) for layer in cache.layers]
        # Padding is on the left, so one mask serves every step: a growing cache reads a prefix of
        # it, a static one reads all of it (causality hides the slots not written yet).
        full_mask = torch.ones((rows, capacity), dtype=torch.long, device=self.device)
        full_mask[:batch.num_rows, :length] = batch.prefill_mask.index_select(0, batch.row_source)
        row_image = _pad_rows(batch.row_image, rows)
        row_length = _pad_rows(batch.row_length, rows)

        watch = _Watch(batch, progress, math.isqrt(n))
        sampler, live_rows = batch.sampler, batch.num_rows
        active = torch.arange(sampler.num_images, device=self.device)  # batch image of each live image
        codes = torch.zeros((sampler.num_images, n), dtype=torch.long, device=self.device)
        for step in range(n):
            next_codes = sampler(row_logits[:live_rows], step)
            codes[active, step] = next_codes
            watch.report(step, codes)
            if step == n - 1:
                break
            leaving = watch.leaving() if not self.static_cache else set()
            if leaving:  # the rows of requests nobody waits for leave the batch now
                keep = torch.tensor([i for i, image in enumerate(active.tolist())
                                     if watch.request_of[image] not in leaving], dtype=torch.long, device=self.device)
                keep_rows = torch.isin(row_image, keep).nonzero().squeeze(-1)
                watch.freed(step, leaving, [watch.request_of[image] for image in active[row_image].tolist()])
                if not len(keep):
                    break
                row_map = torch.full((live_rows,), -1, dtype=torch.long, device=self.device)
                row_map[keep_rows] = torch.arange(len(keep_rows), device=self.device)
                image_map = torch.full((len(active),), -1, dtype=torch.long, device=self.device)
                image_map[keep] = torch.arange(len(keep), device=self.device)
                cache.batch_select_indices(keep_rows)
                full_mask, row_length = full_mask[keep_rows], row_length[keep_rows]
                row_image = image_map[row_image[keep_rows]]
                sampler, active, next_codes = sampler.subset(keep, row_map), active[keep], next_codes[keep]
                live_rows = rows = len(keep_rows)
            embeds = self.model.prepare_embeddings_for_image_generation(next_codes).index_select(0, row_image)
            mask = full_mask if self.static_cache else full_mask[:, :length + step + 1]
            if self.compile_step:
                # Each step is a new iteration for CUDA graphs: the previous step's logits
                # (already consumed by the sampler) may be overwritten.
                torch.compiler.cudagraph_mark_step_begin()
            row_logits = self._step(embeds.unsqueeze(1), (row_length + step).unsqueeze(1), mask, cache)
        return codes, watch.gone

    def _decode_step(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """One token for every row: (R, 1, D) embeddings -> (R, V) float32 generation logits."""
        core = self.model.model
        hidden = core.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     use_cache=True, **{self._cache_kwarg: cache}).last_hidden_state[:, -1]
        return core.generation_head(hidden).float()

    def _static_cache_from(self, prefill_cache: DynamicCache, batch: CfgBatch) -> tuple[StaticCache, int, int]:
        """Copies the prefilled rows into a (reused) static cache.

        Returns:
            The cache, its rows and its length (both rounded up to their buckets).
        """
        rows = _round_up(batch.num_rows, ROW_BUCKET)
        capacity = _round_up(batch.prefix_length + self.num_image_tokens, LENGTH_BUCKET)
        dtype = batch.prefill_embeds.dtype
        key = (rows, capacity, dtype)
        if self._cache_key != key:
            self._cache = StaticCache(config=self.model.model.language_model.config, max_cache_len=capacity)
            self._cache_key = key
        cache = self._cache
        cache.reset()
        # Filler rows (up to the bucket) copy row 0: they compute garbage nobody reads, but
        # keep the shapes, and so the compiled step, the same across calls.
        source = _pad_rows(batch.row_source, rows)
        for static_layer, layer in zip(cache.layers, prefill_cache.layers):
            static_layer.update(layer.keys.index_select(0, source), layer.values.index_select(0, source))
        return cache, rows, capacity


class _ReservedLayer(DynamicLayer):
    """A growing cache layer whose keys and values live in buffers reserved for the whole image.

    transformers' DynamicLayer concatenates every step, which allocates and copies the whole
    cache each time; on the CPU that was half of a 384 px batch's time (`aten::cat`, profiled:
    docs/PERFORMANCE.md). Here a step writes its keys and values in place, and attention reads a
    view of the filled part, the same values as before.

    Args:
        layer: the prefilled layer (distinct rows).
        rows: for every generation row, the distinct row it starts from.
        capacity: positions to reserve (prefix + codes).
    """

    def __init__(self, layer: DynamicLayer, rows: torch.Tensor, capacity: int):
        super().__init__()
        keys, values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        self.length = keys.shape[-2]
        shape = (*keys.shape[:2], capacity, keys.shape[-1])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self._keys[:, :, :self.length] = keys
        self._values[:, :, :self.length] = values
        self.device, self.is_initialized = keys.device, True
        self._expose()

    def _expose(self) -> None:
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._expose()


class _Watch:
    """The decode loop's view of its requests' watchers: due partial images and leavers."""

    def __init__(self, batch: CfgBatch, progress: list[RequestProgress | None], side: int):
        self.request_images = batch.request_images
        self.request_of = [r for r, images in enumerate(batch.request_images) for _ in images]
        self.watched = [(r, p, p.schedule(side)) for r, p in enumerate(progress) if p is not None]
        self.gone: set[int] = set()

    def report(self, step: int, codes: torch.Tensor) -> None:
        for r, progress, schedule in self.watched:
            if step in schedule and r not in self.gone and not progress.cancelled.is_set():
                index, rows = schedule[step]
                images = self.request_images[r]
                progress.on_partial(index, codes[images.start:images.stop].cpu(), rows)

    def leaving(self) -> set[int]:
        """Requests whose watcher left since the last call."""
        new = {r for r, progress, _ in self.watched if r not in self.gone and progress.cancelled.is_set()}
        self.gone |= new
        return new

    def freed(self, step: int, requests: set[int], row_requests: list[int]) -> None:
        """Tells each leaving request's watcher how many rows it gave back (`row_requests`: the
        request of every live row)."""
        for r, progress, _ in self.watched:
            if r in requests and progress.on_freed is not None:
                progress.on_freed(step, row_requests.count(r))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_rows(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Extends a per-row tensor to `rows` entries by repeating its first entry."""
    if values.shape[0] == rows:
        return values
    return torch.cat([values, values[:1].expand(rows - values.shape[0], *values.shape[1:])])
