"""The model deployment: one generation engine per replica, concurrent requests batched.

Requests arrive one by one through the API deployment's handle; `@serve.batch` gathers those
that arrive together (up to `max_batch_size`, waiting at most `batch_wait_timeout_s`) and the
engine generates them as one CFG batch. Each request keeps its own seed, so what it gets does
not depend on what it was batched with.

A `models:/name@alias` source is followed: every `registry_poll_s` the replica asks the
registry where the alias points, and when it has moved, loads that version beside the one
serving and swaps it in. A batch already running finishes on the model it started with, so
no request in flight fails on a swap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from janus_lab.generation import GenerationEngine, GenerationRequest, GenerationRequestError, PreparedRequest
from janus_lab.generation.loading import (
    BUILT_IN_MODELS,
    RegisteredVersion,
    build_built_in,
    registered_version,
    resolve_model_uri,
)
from janus_lab.generation.offline import resolve_device_and_dtype
from janus_lab.generation.requests import validate_request
from janus_lab.model.weights import load_pretrained
from janus_lab.serving.settings import ModelUserConfig, ServeArgs

logger = logging.getLogger("ray.serve")

PAYLOAD_FIELDS = ("prompt", "input_images", "parallel_size", "cfg_weight", "cfg_weight2", "temperature",
                  "top_k", "top_p", "seed")
"""What the API may pass in a generation payload (GenerationRequest's fields)."""


@dataclass
class LoadedModel:
    """One loaded model and what `/v1/models` says about it."""

    engine: GenerationEngine
    source: str
    """The URI it was loaded from (a registry alias resolves to its version's URI)."""
    version: RegisteredVersion | None
    folder: str | None
    """The downloaded registry artifacts, removed when the model is replaced."""
    loaded_at: float

    def describe(self) -> dict[str, Any]:
        version = self.version
        return {
            "id": version.name if version else self.source,
            "version": version.version if version else None,
            "alias": version.alias if version else None,
            "run_id": version.run_id if version else None,
            "source": self.source,
            "image_size": self.engine.image_size,
            "loaded_at": int(self.loaded_at),
        }

    def release(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def load_model(args: ServeArgs, max_batch_size: int) -> LoadedModel:
    """Loads what `args.model` points at now (blocking: downloads and reads the weights)."""
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    limits = args.limits.generation_limits(max_batch_size)
    if args.model in BUILT_IN_MODELS:
        bundle, version, folder, source = build_built_in(args.model, device, dtype), None, None, args.model
    else:
        version = registered_version(args.model)
        source = version.uri if version else args.model
        folder = tempfile.mkdtemp(prefix="janus-serve-") if version else None
        try:
            bundle = load_pretrained(resolve_model_uri(source, download_dir=folder), dtype=dtype, device=device)
        except BaseException:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise
    engine = GenerationEngine.from_bundle(bundle, limits=limits, compile_step=args.compile and device.type == "cuda")
    return LoadedModel(engine=engine, source=source, version=version, folder=folder, loaded_at=time.time())


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@serve.deployment(name="ImageModel", max_ongoing_requests=8, max_queued_requests=16,
                  ray_actor_options={"num_cpus": 1})
class ImageModel:
    """Generates images for the API deployment.

    Args:
        args: the application's `args` (see `ServeArgs`).
    """

    def __init__(self, args: dict[str, Any]):
        self.args = ServeArgs.parse(args)
        self.settings = ModelUserConfig()
        self.current = load_model(self.args, self.settings.max_batch_size)
        self._poller: asyncio.Task | None = None
        logger.info("serving %s", self.current.describe())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Applies `user_config` (batching, registry polling) to this running replica."""
        self.settings = ModelUserConfig.parse(user_config)
        self._run_batch.set_max_batch_size(self.settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.current.engine.limits = self.args.limits.generation_limits(self.settings.max_batch_size)
        if self._poller:
            self._poller.cancel()
            self._poller = None
        if self.current.version and self.current.version.alias and self.settings.registry_poll_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._follow_alias())

    async def info(self) -> dict[str, Any]:
        """What this replica serves."""
        return self.current.describe()

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Checks one request, then generates it in a batch with whatever else is waiting.

        Args:
            payload: GenerationRequest fields; input images as encoded bytes. Left-out sampling
                fields take the configured defaults.

        Returns:
            `{"images": [PNG bytes], "seed": int, "model": {...}}`, or `{"error": {"param",
            "message"}}` for a request that fails a check (nothing generated).
        """
        unknown = sorted(set(payload) - set(PAYLOAD_FIELDS))
        if unknown:
            return {"error": {"param": unknown[0], "message": f"{unknown[0]}: unknown field"}}
        defaults = {k: v for k, v in dataclasses.asdict(self.args.defaults).items() if v is not None}
        request = GenerationRequest(**{**defaults, **payload})
        engine = self.current.engine
        try:
            prepared = await asyncio.to_thread(validate_request, request, engine.limits, engine.builder,
                                               engine.max_sequence_length)
        except GenerationRequestError as err:
            return {"error": {"param": err.field, "message": str(err)}}
        return await self._run_batch(prepared)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _run_batch(self, batch: list[PreparedRequest]) -> list[dict[str, Any]]:
        current = self.current  # a swap during this batch does not touch it
        return await asyncio.to_thread(self._generate_and_encode, current, batch)

    @staticmethod
    def _generate_and_encode(current: LoadedModel, batch: list[PreparedRequest]) -> list[dict[str, Any]]:
        results = current.engine.generate_prepared(batch)
        model = current.describe()
        return [{"images": [encode_png(image) for image in result.images], "seed": result.seed, "model": model}
                for result in results]

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            try:
                now = await asyncio.to_thread(registered_version, self.args.model)
                if now and self.current.version and now.version != self.current.version.version:
                    logger.info("%s moved from version %s to %s: loading it", self.args.model,
                                self.current.version.version, now.version)
                    loaded = await asyncio.to_thread(load_model, self.args, self.settings.max_batch_size)
                    previous, self.current = self.current, loaded
                    previous.release()
                    logger.info("now serving %s", loaded.describe())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a registry hiccup must not stop serving the loaded model
                logger.exception("checking %s in the registry failed; still serving version %s",
                                 self.args.model, self.current.version.version if self.current.version else "?")

    def __del__(self) -> None:
        current = getattr(self, "current", None)
        if current is not None:
            current.release()
