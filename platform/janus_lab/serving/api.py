"""The HTTP API: OpenAI-style image endpoints in front of the model deployment.

    POST /v1/images/generations   JSON {prompt, n, cfg_weight, temperature, seed, response_format,
                                  stream, partial_images}
    POST /v1/images/edits         multipart: image (one or more files), prompt, n, cfg_weight,
                                  cfg_weight2, temperature, seed, response_format, stream, partial_images
    GET  /v1/models               the registered version being served, its run and sampling defaults
    GET  /                        the web playground (playground.html)
    GET  /healthz                 open to all; every other endpoint needs `Authorization: Bearer <key>`
                                  when `args.access` names keys (janus_lab.serving.access)

The key is checked before the body is read: none or a wrong one is a 401. Past a key's
requests or images per minute the answer is a 429 with Retry-After.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with `param`
naming the offending field. Everything a request can get wrong is checked here or in the model
deployment's `validate_request` before any generation; a full queue is a 503 with Retry-After.
A model replica that dies under a request (killed, out of memory, its node lost) fails no
request silently: the call goes again to a live replica (`REPLICA_RETRIES` times; generation
has no side effects and a request keeps its seed), and past that the answer is a 503 with
Retry-After and code `replica_unavailable` (docs/reliability.md).

`stream: true` answers with server-sent events as the OpenAI Images API defines them:
`image_generation.partial_image` / `image_edit.partial_image` (b64_json, partial_image_index;
`partial_images` of them, 0-3, the rows finished so far over grey), then
`image_generation.completed` / `image_edit.completed`. A streaming request shares the CFG batch
with the others; when its client disconnects, its rows leave the batch at the next step.
"""

# No `from __future__ import annotations`: FastAPI must see `request: Request` as a type, not a string.

import base64
import io
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from janus_lab.generation.progress import MAX_PARTIAL_IMAGES
from janus_lab.generation.requests import SEED_LIMIT
from janus_lab.serving.access import ApiKeys
from janus_lab.serving.settings import ADAPTER_NAME, ServeArgs, ServeLimits

logger = logging.getLogger("ray.serve")

PLAYGROUND = (Path(__file__).parent / "playground.html").read_text()
"""The page served at `/`."""
RESPONSE_FORMATS = ("b64_json", "png")
RETRY_AFTER_S = 1
"""What a 503 tells clients to wait; a batch on the debug model takes about that long."""
REPLICA_RETRIES = 2
"""Times a request whose model replica died is sent again before the client gets a 503."""
REPLICA_GONE = (RayActorError, ActorUnavailableError)
"""What awaiting a model call raises when its replica died or cannot be reached."""

GENERATION_FIELDS = {"prompt", "n", "cfg_weight", "temperature", "seed", "response_format", "top_k", "top_p",
                     "model", "size", "user", "stream", "partial_images"}
EDIT_FIELDS = GENERATION_FIELDS | {"cfg_weight2", "image", "image[]"}
"""Accepted keys; `model`, `size` and `user` are what OpenAI clients send (`model` picks an
adapter as `<id>:<adapter>` and is otherwise ignored, size must match the model's, user is ignored)."""


class ApiError(Exception):
    """A request the API refuses: the HTTP status, the field, and why (plus OpenAI's error
    `type` and `code` where they differ from the defaults, and response headers)."""

    def __init__(self, status: int, param: str | None, message: str, *, kind: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.message = status, param, message
        self.kind, self.code, self.headers = kind, code, headers


def error_response(status: int, param: str | None, message: str, headers: dict | None = None, *,
                   kind: str | None = None, code: str | int | None = None) -> JSONResponse:
    if kind is None:
        kind = "invalid_request_error" if status < 500 else ("overloaded" if status == 503 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status if code is None else code}},
                        status_code=status, headers=headers)


# --------------------------------------------------------------------------- field parsing


def _integer(value: Any, name: str, minimum: int, maximum: int, *, from_text: bool) -> int:
    if from_text and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(400, name, f"{name}: must be an integer, got {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, name, f"{name}: must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ApiError(400, name, f"{name}: must be between {minimum} and {maximum}, got {value}")
    return value


def _number(value: Any, name: str, *, from_text: bool) -> float:
    if from_text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ApiError(400, name, f"{name}: must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, name, f"{name}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ApiError(400, name, f"{name}: must be finite, got {value}")
    if value < 0:
        raise ApiError(400, name, f"{name}: must be >= 0, got {value}")
    return float(value)


def parse_fields(fields: dict[str, Any], allowed: set[str], limits: ServeLimits, image_size: int | None,
                 *, from_text: bool) -> tuple[dict[str, Any], str]:
    """Checks a request's scalar fields; returns the model payload and the response format.

    Args:
        fields: the JSON body, or the multipart form's text fields (`from_text`: values are
            strings and are converted).
        allowed: the endpoint's accepted keys.
        limits: the configured limits.
        image_size: the served model's side, to check `size` against (None: unknown yet).

    Raises:
        ApiError: 400 naming the first bad field.
    """
    for key in fields:
        if key not in allowed:
            raise ApiError(400, key, f"{key}: unknown field; accepted: {', '.join(sorted(allowed))}")
    prompt = fields.get("prompt")
    if prompt is None:
        raise ApiError(400, "prompt", "prompt: is required")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt", f"prompt: must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ApiError(400, "prompt", "prompt: is empty")
    payload: dict[str, Any] = {"prompt": prompt}
    if fields.get("n") is not None:
        payload["parallel_size"] = _integer(fields["n"], "n", 1, limits.max_n, from_text=from_text)
    for name in ("cfg_weight", "cfg_weight2", "temperature"):
        if fields.get(name) is not None:
            payload[name] = _number(fields[name], name, from_text=from_text)
    if fields.get("top_k") is not None:
        payload["top_k"] = _integer(fields["top_k"], "top_k", 1, 1 << 20, from_text=from_text)
    if fields.get("top_p") is not None:
        top_p = _number(fields["top_p"], "top_p", from_text=from_text)
        if not 0 < top_p <= 1:
            raise ApiError(400, "top_p", f"top_p: must be in (0, 1], got {top_p}")
        payload["top_p"] = top_p
    if fields.get("seed") is not None:
        payload["seed"] = _integer(fields["seed"], "seed", 0, SEED_LIMIT - 1, from_text=from_text)
    response_format = fields.get("response_format") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, "response_format",
                       f"response_format: must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
    if response_format == "png" and payload.get("parallel_size", 1) != 1:
        raise ApiError(400, "response_format", "response_format: png returns one image; use n=1 or b64_json")
    size = fields.get("size")
    if size is not None and image_size is not None and size not in ("auto", f"{image_size}x{image_size}"):
        raise ApiError(400, "size", f"size: this model generates {image_size}x{image_size}, got {size!r}")
    return payload, response_format


def parse_stream(fields: dict[str, Any], response_format: str, *, from_text: bool) -> int | None:
    """`stream` and `partial_images`: None for a plain request, else the partial images wanted (0-3).

    Raises:
        ApiError: 400 for a non-boolean `stream`, `partial_images` out of range or without
            `stream`, or a streamed `response_format` other than b64_json.
    """
    stream = fields.get("stream")
    if from_text and isinstance(stream, str) and stream.strip().lower() in ("true", "false"):
        stream = stream.strip().lower() == "true"
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream", f"stream: must be true or false, got {stream!r}")
    partial = fields.get("partial_images")
    if partial is not None:
        partial = _integer(partial, "partial_images", 0, MAX_PARTIAL_IMAGES, from_text=from_text)
    if not stream:
        if partial:
            raise ApiError(400, "partial_images", "partial_images: needs stream=true")
        return None
    if response_format != "b64_json":
        raise ApiError(400, "response_format", "response_format: a stream sends b64_json events")
    return partial or 0


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    """One server-sent event, as the OpenAI Images API sends it (`data` carries `type` too)."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def check_image(data: bytes, limits: ServeLimits, name: str) -> None:
    """Size in bytes, then pixels from the header; the image itself is not decoded here.

    Raises:
        ApiError: 413 past the upload limit; 400 for no image or too many pixels.
    """
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, name, f"{name}: {len(data)} bytes, more than the limit of {limits.max_upload_bytes}")
    if not data:
        raise ApiError(400, name, f"{name}: is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ApiError(400, name, f"{name}: claims too many pixels ({err})") from None
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, it is not an image
        raise ApiError(400, name, f"{name}: is not an image PIL can read ({type(err).__name__})") from None
    if width * height > limits.max_input_pixels:
        raise ApiError(400, name, f"{name}: {width}x{height} = {width * height} pixels, "
                                  f"more than the limit of {limits.max_input_pixels}")


def pick_adapter(model: Any, adapters: set[str]) -> str | None:
    """The adapter a request's `model` names (`janus-4o:style` -> `style`), or None for the base.

    Any other `model` (OpenAI clients send their own default) means the served model itself.

    Raises:
        ApiError: 400 for a `model` that is not a string; 404 for `<id>:<name>` naming no adapter here.
    """
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise ApiError(400, "model", f"model: must be a string, got {type(model).__name__}")
    _, colon, name = model.rpartition(":")
    if not colon or not ADAPTER_NAME.fullmatch(name):
        return None
    if name not in adapters:
        raise ApiError(404, "model", f"model: no adapter named {name!r}; this server has "
                                     f"{', '.join(sorted(adapters)) or 'none'}", code="model_not_found")
    return name


def model_error(error: dict[str, Any]) -> ApiError:
    """The model deployment's refusal as the API's 4xx (400 unless it says otherwise), its field
    named as the client sent it (`input_images[1]` -> `image[1]`, `parallel_size` -> `n`)."""
    param = error["param"].removeprefix("input_images").replace("parallel_size", "n")
    param = f"image{param}" if error["param"].startswith("input_images") else param
    status = error.get("status", 400)
    return ApiError(status, param, error["message"], code="model_not_found" if status == 404 else None)


# --------------------------------------------------------------------------- the deployment

app = FastAPI(title="janus-lab images", description="Text-to-image and editing with a Janus-4o-style model")


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return error_response(err.status, err.param, err.message, err.headers, kind=err.kind, code=err.code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return error_response(400, param, f"{param}: {first.get('msg', 'invalid request')}")


@serve.deployment(name="ImageApi", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class ImageApi:
    """Checks the API key, parses and checks HTTP requests, then awaits the model deployment.

    Args:
        model: handle of the `ImageModel` deployment.
        args: the application's `args` (limits, access).
        limiter: handle of the `ApiLimiter` deployment that counts every key's use across API
            replicas (None: no per-key limits).
    """

    def __init__(self, model: DeploymentHandle, args: dict[str, Any], limiter: DeploymentHandle | None = None):
        parsed = ServeArgs.parse(args)
        self.model = model
        self.limits = parsed.limits
        self.access = parsed.access
        self.adapters = set(parsed.adapters)
        self.keys = ApiKeys(parsed.access)  # an unset or empty key source fails the replica here
        self.limiter = limiter if (parsed.access.requests_per_minute or parsed.access.images_per_minute) else None
        self.last_model: dict[str, Any] | None = None
        if parsed.access.open:
            logger.warning(self.keys.describe())
        else:
            logger.info(self.keys.describe())

    @app.get("/", response_class=HTMLResponse)
    async def playground(self) -> HTMLResponse:
        """The web playground (plain HTML and JS over this API); the page itself needs no key,
        its requests send the one typed into it."""
        return HTMLResponse(PLAYGROUND)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.last_model}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        try:
            info = await self._call_model(lambda: self.model.info.remote(), "/v1/models")
        except BackPressureError:
            return self._overloaded()
        self.last_model = info
        base = {"object": "model", "owned_by": "janus-lab", **info}
        return JSONResponse({"object": "list", "data": [base] + [
            {**base, "id": f"{info['id']}:{name}", "adapter": name} for name in sorted(self.adapters)]})

    @app.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        key = self._authorize(request)
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any parse failure is the client's
            raise ApiError(400, None, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, None, f"the body must be a JSON object, got {type(body).__name__}")
        payload, response_format = parse_fields(body, GENERATION_FIELDS, self.limits, self._image_size(),
                                                from_text=False)
        partial_images = parse_stream(body, response_format, from_text=False)
        adapter = pick_adapter(body.get("model"), self.adapters)
        await self._admit(key, payload.get("parallel_size", 1))
        if partial_images is not None:
            return await self._stream(payload, partial_images, "image_generation", adapter)
        return await self._generate(payload, response_format, adapter)

    @app.post("/v1/images/edits")
    async def edits(self, request: Request) -> Response:
        key = self._authorize(request)
        most = self.limits.max_input_images * self.limits.max_upload_bytes + (1 << 20)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > most:
            raise ApiError(413, "image", f"the request has {length} bytes, more than the limit of {most}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, None, "edits take multipart/form-data: image files plus prompt and settings")
        try:
            form = await request.form(max_files=self.limits.max_input_images + 1)
        except Exception as err:  # noqa: BLE001 - malformed multipart bodies
            raise ApiError(400, "image", f"could not read the form: {err}") from None
        files: list[UploadFile] = []
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "image", "image: must be a file upload")
                files.append(value)
            elif key in fields:
                raise ApiError(400, key, f"{key}: given more than once")
            else:
                fields[key] = value
        for key, value in fields.items():
            if isinstance(value, UploadFile):
                raise ApiError(400, key, f"{key}: must be a form field, not a file")
        payload, response_format = parse_fields(fields, EDIT_FIELDS, self.limits, self._image_size(),
                                                from_text=True)
        partial_images = parse_stream(fields, response_format, from_text=True)
        adapter = pick_adapter(fields.get("model"), self.adapters)
        if not files:
            raise ApiError(400, "image", "image: an edit needs at least one input image file")
        if len(files) > self.limits.max_input_images:
            raise ApiError(400, "image", f"image: {len(files)} files, more than the limit of "
                                         f"{self.limits.max_input_images}")
        images = []
        for index, upload in enumerate(files):
            data = await upload.read(self.limits.max_upload_bytes + 1)
            check_image(data, self.limits, f"image[{index}]")
            images.append(data)
        payload["input_images"] = images
        await self._admit(key, payload.get("parallel_size", 1))
        if partial_images is not None:
            return await self._stream(payload, partial_images, "image_edit", adapter)
        return await self._generate(payload, response_format, adapter)

    def _handle(self, adapter: str | None) -> DeploymentHandle:
        """The model deployment, routed (multiplexing) to a replica holding `adapter` if one does."""
        return self.model.options(multiplexed_model_id=adapter) if adapter else self.model

    async def _generate(self, payload: dict[str, Any], response_format: str, adapter: str | None) -> Response:
        try:
            result = await self._call_model(lambda: self._handle(adapter).generate.remote(payload), "a generation")
        except BackPressureError:
            return self._overloaded()
        if "error" in result:
            raise model_error(result["error"])
        self.last_model = result["model"]
        headers = {"X-Seed": str(result["seed"]), "X-Model-Version": str(result["model"]["version"])}
        if response_format == "png":
            return Response(result["images"][0], media_type="image/png", headers=headers)
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in result["images"]],
            "seed": result["seed"],
            "model": result["model"],
        }, headers=headers)

    async def _stream(self, payload: dict[str, Any], partial_images: int, kind: str, adapter: str | None) -> Response:
        """Server-sent events `<kind>.partial_image` (each image's partial images as they arrive)
        then `<kind>.completed` (one per image; `image_index` says which of `n`).

        The request is checked before the stream opens, so a bad one is still a 4xx.
        """
        stream = self._handle(adapter).options(stream=True).generate_stream.remote(payload, partial_images)
        try:
            first = await stream.__anext__()
        except BackPressureError:
            return self._overloaded()
        if "error" in first:
            raise model_error(first["error"])
        accepted = first["accepted"]
        side = accepted["image_size"]
        common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": f"{side}x{side}"}

        async def events():
            async for item in stream:
                now = int(time.time())
                if "partial" in item:
                    for index, png in enumerate(item["images"]):
                        yield sse_event(f"{kind}.partial_image", {
                            **common, "b64_json": base64.b64encode(png).decode("ascii"), "created_at": now,
                            "partial_image_index": item["partial"], "image_index": index, "rows": item["rows"]})
                elif "images" in item:
                    self.last_model = item["model"]
                    for index, png in enumerate(item["images"]):
                        yield sse_event(f"{kind}.completed", {
                            **common, "b64_json": base64.b64encode(png).decode("ascii"), "created_at": now,
                            "image_index": index, "seed": item["seed"], "usage": accepted["usage"],
                            "model": item["model"]})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"X-Seed": str(accepted["seed"]), "Cache-Control": "no-cache"})

    def _authorize(self, request: Request) -> str:
        """The id of the request's API key (the body is not read).

        Raises:
            ApiError: 401 for a missing, malformed or unknown key (the key is never echoed).
        """
        key = self.keys.identify(request.headers.get("authorization"))
        if key is not None:
            return key
        sent = request.headers.get("authorization")
        message = ("invalid API key" if sent and sent.strip().lower().startswith("bearer ")
                   else "missing API key: send the header `Authorization: Bearer <key>`")
        raise ApiError(401, None, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _admit(self, key: str, images: int) -> None:
        """Counts a checked request against its key's limits, in the limiter all replicas share.

        Raises:
            ApiError: 429 with Retry-After past a limit (nothing is counted then).
        """
        if self.limiter is None:
            return
        decision = await self.limiter.admit.remote(key, images)
        if decision["allowed"]:
            return
        limit = decision["limit"]
        most = self.access.requests_per_minute if limit == "requests" else self.access.images_per_minute
        raise ApiError(429, None, f"rate limit: key {key} may ask for {most} {limit} per minute; retry in "
                                  f"{decision['retry_after_s']} s",
                       kind=limit, code="rate_limit_exceeded",
                       headers={"Retry-After": str(decision["retry_after_s"])})

    @staticmethod
    async def _call_model(call, what: str):
        """Awaits `call()`, sending it again when the model replica died under it.

        Raises:
            ApiError: 503 `replica_unavailable` once `REPLICA_RETRIES` retries failed too.
        """
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                return await call()
            except REPLICA_GONE as err:
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                if attempt == REPLICA_RETRIES:
                    logger.error("the model replica died under %s %d times (%s); answering 503", what,
                                 attempt + 1, reason)
                    raise ApiError(503, None, "the model replica serving this request stopped and no other "
                                              "answered in time; retry later", kind="server_error",
                                   code="replica_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
                logger.warning("the model replica died under %s (%s): retry %d/%d on another replica", what,
                               reason, attempt + 1, REPLICA_RETRIES)

    def _image_size(self) -> int | None:
        return self.last_model["image_size"] if self.last_model else None

    @staticmethod
    def _overloaded() -> JSONResponse:
        return error_response(503, None, "the server is at its queue limit; retry later",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
