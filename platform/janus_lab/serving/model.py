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
import collections
import contextlib
import dataclasses
import io
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ray import serve

from janus_lab.generation import GenerationEngine, GenerationRequest, GenerationRequestError, PreparedRequest
from janus_lab.generation.loading import (
    BUILT_IN_MODELS,
    RegisteredVersion,
    build_built_in,
    load_model_folder,
    registered_version,
    resolve_model_uri,
)
from janus_lab.generation.offline import resolve_device_and_dtype
from janus_lab.generation.progress import RequestProgress
from janus_lab.generation.requests import validate_request
from janus_lab.model.adapters import AdapterError, base_identity
from janus_lab.serving.adapters import AdapterHandle, AdapterHost
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
    run_url: str | None = None
    """The MLflow UI page of the version's run, when the tracking server is reachable over HTTP."""
    host: AdapterHost | None = None
    """The LoRA adapters served over this model (None: no `adapters` configured)."""

    def describe(self, adapter: str | None = None) -> dict[str, Any]:
        version = self.version
        return {
            "id": version.name if version else self.source,
            "version": version.version if version else None,
            "alias": version.alias if version else None,
            "run_id": version.run_id if version else None,
            "source": self.source,
            "image_size": self.engine.image_size,
            "loaded_at": int(self.loaded_at),
            "adapter": adapter,
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
            bundle = load_model_folder(resolve_model_uri(source, download_dir=folder), device=device, dtype=dtype)
        except BaseException:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise
    engine = GenerationEngine.from_bundle(bundle, limits=limits, compile_step=args.compile and device.type == "cuda")
    host = None
    if args.adapters:
        identity = source if source not in BUILT_IN_MODELS else base_identity(source, None, bundle.image_size, 0)
        host = AdapterHost(bundle.model, identity, args.adapters)
    return LoadedModel(engine=engine, source=source, version=version, folder=folder, loaded_at=time.time(),
                       run_url=run_url(version), host=host)


def run_url(version: RegisteredVersion | None) -> str | None:
    """`<tracking server>/#/experiments/<id>/runs/<run id>` of a registered version's run, or None
    (no run, or a tracking URI that is not an HTTP server a browser could open)."""
    if version is None or not version.run_id:
        return None
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        experiment = MlflowClient().get_run(version.run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a nicety; serving must not fail for it
        logger.warning("could not read run %s from %s: no run link", version.run_id, uri)
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{version.run_id}"


def usage(prepared: PreparedRequest, num_image_tokens: int) -> dict[str, Any]:
    """Tokens in and out, in the shape of the OpenAI Images API's `usage` (each input image
    takes its SigLIP and its VQ slots)."""
    image_tokens = 2 * num_image_tokens * len(prepared.images)
    output = num_image_tokens * prepared.request.parallel_size
    return {"input_tokens": prepared.prefix_length, "output_tokens": output,
            "total_tokens": prepared.prefix_length + output,
            "input_tokens_details": {"text_tokens": prepared.prefix_length - image_tokens,
                                     "image_tokens": image_tokens}}


def _partial_pngs(engine: GenerationEngine, codes, rows: int) -> list[bytes]:
    return [encode_png(image) for image in engine.decode_partial(codes, rows)]


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
        self._adapter = None
        if self.args.adapters:
            async def load_adapter(name: str) -> AdapterHandle:
                host = self.current.host
                await asyncio.to_thread(host.load, name)
                return AdapterHandle(host, name)

            # Applied here rather than on a method: the LRU's size comes from the deployment's args.
            self._adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_adapters_per_replica)(
                load_adapter)
        logger.info("serving %s%s", self.current.describe(),
                    f" with adapters {', '.join(sorted(self.args.adapters))}" if self.args.adapters else "")

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
        """What this replica serves, with its sampling defaults (what the playground fills in)."""
        return {**self.current.describe(), "run_url": self.current.run_url,
                "defaults": dataclasses.asdict(self.args.defaults), "adapters": sorted(self.args.adapters)}

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Checks one request, then generates it in a batch with whatever else is waiting.

        Args:
            payload: GenerationRequest fields; input images as encoded bytes. Left-out sampling
                fields take the configured defaults.

        Returns:
            `{"images": [PNG bytes], "seed": int, "model": {...}}`, or `{"error": {"param",
            "message"}}` for a request that fails a check (nothing generated).
        """
        checked = await self._check(payload)
        if isinstance(checked, dict):
            return checked
        prepared, adapter = checked
        return await self._run_batch((prepared, None, adapter))

    async def generate_stream(self, payload: dict[str, Any], partial_images: int = 0) -> AsyncIterator[dict[str, Any]]:
        """`generate`, watched: yields what the request has become as the batch goes on.

        A streaming request joins the same `@serve.batch` CFG batch as the others. If the caller
        goes away before the end (a client that disconnects), the request's rows leave the batch
        at the next step and the others go on unchanged.

        Yields:
            First `{"accepted": {"seed", "usage", "image_size"}}` (or `{"error": ...}` and nothing else); then
            `{"partial": i, "rows": r, "images": [PNG bytes]}` for each of the `partial_images`
            (0-3) partial images; last `generate`'s result.
        """
        checked = await self._check(payload)
        if isinstance(checked, dict):
            yield checked
            return
        checked, adapter = checked
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue = asyncio.Queue()
        label = f"request seed={checked.seed} prompt={checked.request.prompt[:40]!r}"
        progress = RequestProgress(
            partial_images=partial_images,
            on_partial=lambda index, codes, rows: loop.call_soon_threadsafe(arrived.put_nowait, (index, codes, rows)),
            on_freed=lambda step, rows: logger.info("%s: its client left; its %d rows left the batch at step %d",
                                                    label, rows, step))
        engine = self.current.engine
        batch = asyncio.ensure_future(self._run_batch((checked, progress, adapter)))
        batch.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, never lost
        done = False
        try:
            yield {"accepted": {"seed": checked.seed, "usage": usage(checked, engine.num_image_tokens),
                                "image_size": engine.image_size}}
            while True:
                waiting = asyncio.ensure_future(arrived.get())
                await asyncio.wait({waiting, batch}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    break
                index, codes, rows = waiting.result()
                yield {"partial": index, "rows": rows,
                       "images": await asyncio.to_thread(_partial_pngs, engine, codes, rows)}
            while not arrived.empty():  # partials that arrived together with the end
                index, codes, rows = arrived.get_nowait()
                yield {"partial": index, "rows": rows,
                       "images": await asyncio.to_thread(_partial_pngs, engine, codes, rows)}
            done = True
            yield await batch
        finally:
            if not done:
                progress.cancelled.set()
                logger.info("%s: the stream was closed before the image was done; freeing its rows", label)

    async def _check(self, payload: dict[str, Any]) -> tuple[PreparedRequest, str | None] | dict[str, Any]:
        """The request, checked and ready for the engine, and the adapter it asked for (the
        multiplexed model id; None: the base); or `{"error": {"param", "message"}}`."""
        adapter = serve.get_multiplexed_model_id() or None
        if adapter is not None:
            try:
                if self._adapter is None:
                    raise AdapterError(f"no adapter named {adapter!r}; this server serves no adapters")
                await self._adapter(adapter)
            except AdapterError as err:
                return {"error": {"param": "model", "message": f"model: {err}", "status": 404}}
        unknown = sorted(set(payload) - set(PAYLOAD_FIELDS))
        if unknown:
            return {"error": {"param": unknown[0], "message": f"{unknown[0]}: unknown field"}}
        defaults = {k: v for k, v in dataclasses.asdict(self.args.defaults).items() if v is not None}
        request = GenerationRequest(**{**defaults, **payload})
        engine = self.current.engine
        try:
            return await asyncio.to_thread(validate_request, request, engine.limits, engine.builder,
                                           engine.max_sequence_length), adapter
        except GenerationRequestError as err:
            return {"error": {"param": err.field, "message": str(err)}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _run_batch(self, batch: list[tuple[PreparedRequest, RequestProgress | None, str | None]]
                         ) -> list[dict[str, Any]]:
        current = self.current  # a swap during this batch does not touch it
        return await asyncio.to_thread(self._generate_and_encode, current, batch)

    @staticmethod
    def _generate_and_encode(current: LoadedModel, batch: list[tuple[PreparedRequest, RequestProgress | None,
                                                                     str | None]]) -> list[dict[str, Any]]:
        """Generates a batch, one CFG batch per adapter in it (the base's requests are one more)."""
        streaming = sum(watch is not None for _, watch, _ in batch)
        if streaming:
            logger.info("generating a batch of %d requests, %d of them streaming", len(batch), streaming)
        groups: dict[str | None, list[int]] = collections.defaultdict(list)
        for index, (_, _, adapter) in enumerate(batch):
            groups[adapter].append(index)
        outputs: list[dict[str, Any]] = [{}] * len(batch)
        for adapter, indices in groups.items():
            with current.host.using(adapter, set(groups)) if current.host else contextlib.nullcontext():
                results = current.engine.generate_prepared([batch[i][0] for i in indices],
                                                           progress=[batch[i][1] for i in indices])
            model = current.describe(adapter)
            for index, result in zip(indices, results):
                outputs[index] = ({"cancelled": True} if result.cancelled else
                                  {"images": [encode_png(image) for image in result.images], "seed": result.seed,
                                   "model": model})
        return outputs

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
