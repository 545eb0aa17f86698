"""Offline generation: requests from a JSONL file or the command line -> PNGs, a contact sheet
and a results file. What `jobs/generate.py` runs, and what evaluation reuses.

A JSONL line is one request: `{"prompt": ..., "input_images": ["cat.png"], "parallel_size": 2,
"seed": 7, ...}` with any field of `GenerationRequest`; image paths are relative to the JSONL
file's folder, and fields a line leaves out take the run's settings. Output:

    <output_dir>/images/<request>-<image>.png   every generated image
    <output_dir>/contact_sheet.png              one row per request: its inputs, then its outputs
    <output_dir>/results.jsonl                  per request: prompt, seed, image files, codes
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from janus_lab.data.images import letterbox
from janus_lab.generation.engine import GenerationEngine
from janus_lab.generation.loading import load_generation_model
from janus_lab.generation.requests import (
    GenerationLimits,
    GenerationRequest,
    GenerationRequestError,
    GenerationResult,
    check_sampling,
)
from janus_lab.settings import ModelSource, SamplingSettings

SHEET_GAP = 4


@dataclasses.dataclass
class GenerateConfig(ModelSource, SamplingSettings):
    """One offline generation run: which model (`ModelSource`), which requests, how to sample
    (`SamplingSettings`), where to write."""

    requests: str | None = None
    """JSONL file of requests (one JSON object per line); or give `prompt` instead."""
    prompt: str | None = None
    """A single prompt from the command line (with `input_images` for editing)."""
    input_images: list[str] = dataclasses.field(default_factory=list)
    """Input image files of the command-line prompt; empty: text-to-image."""
    output_dir: str = "outputs/generated"
    """Folder for the PNGs, contact_sheet.png and results.jsonl."""
    parallel_size: int = 4
    """Images per request (a JSONL line may set its own)."""
    seed: int = 0
    """Seed of the first request; request i without its own seed uses seed + i."""
    batch_images: int = 16
    """Images generated together in one engine batch."""
    sheet_rows: int = 32
    """Requests shown on the contact sheet (the first ones)."""

    def __post_init__(self) -> None:
        ModelSource.__post_init__(self)
        SamplingSettings.__post_init__(self)
        if (self.requests is None) == (self.prompt is None):
            raise ValueError("requests (a JSONL file) or prompt must be given, and not both")
        if self.input_images and self.prompt is None:
            raise ValueError("input_images goes with prompt; a JSONL line lists its own input_images")
        for name in ("batch_images", "sheet_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        try:
            # The request checks, so that a bad setting fails at parse time, not after loading.
            check_sampling(GenerationRequest("", **self.sampling_settings()), self.limits())
        except GenerationRequestError as err:
            raise ValueError(f"{err.field} {err.reason}") from None

    def limits(self) -> GenerationLimits:
        """A request may ask for at most one batch of images."""
        return GenerationLimits(max_parallel_size=self.batch_images, max_batch_images=self.batch_images)

    def sampling_settings(self) -> dict:
        """The request fields this run sets for every request that does not set its own."""
        return {"parallel_size": self.parallel_size, **self.sampling_dict()}


@dataclasses.dataclass
class GenerateSummary:
    """What a run wrote."""

    num_requests: int
    num_images: int
    output_dir: Path
    contact_sheet: Path
    results_file: Path


def read_request_file(path: str | Path, defaults: dict | None = None, first_seed: int = 0) -> list[GenerationRequest]:
    """Reads requests from a JSONL file; input image paths are relative to the file's folder.

    Args:
        path: the JSONL file.
        defaults: values for fields a line leaves out.
        first_seed: line i (counting requests) without a seed gets first_seed + i.

    Raises:
        GenerationRequestError: a line that is not a JSON object, an unknown field, a missing
            prompt or a missing image file; the field is prefixed with `line N`.
    """
    path = Path(path)
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerationRequestError(where, f"is not valid JSON ({err})") from None
        try:
            if isinstance(data, dict) and "input_images" in data:
                data = {**data, "input_images": _read_images(data["input_images"], path.parent)}
            request = GenerationRequest.from_dict(data, defaults)
        except GenerationRequestError as err:
            raise err.within(where) from None
        if request.seed is None:
            request.seed = first_seed + len(requests)
        requests.append(request)
    if not requests:
        raise GenerationRequestError(str(path), "holds no requests")
    return requests


def _read_images(paths, folder: Path) -> list[bytes]:
    if not isinstance(paths, list):
        raise GenerationRequestError("input_images", "must be a list of image file paths")
    images = []
    for k, name in enumerate(paths):
        file = folder / str(name)
        if not file.is_file():
            raise GenerationRequestError(f"input_images[{k}]", f"file {file} does not exist")
        images.append(file.read_bytes())  # decoded (and checked) by the engine's validation
    return images


def contact_sheet(rows: Sequence[Sequence[Image.Image]], tile: int) -> Image.Image:
    """Lays images out in rows on a white sheet, each letterboxed to `tile` x `tile` (as the model sees it)."""
    columns = max((len(row) for row in rows), default=1)
    sheet = Image.new("RGB", (columns * (tile + SHEET_GAP) + SHEET_GAP, len(rows) * (tile + SHEET_GAP) + SHEET_GAP),
                      "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            thumb = letterbox(image, tile)
            sheet.paste(thumb, (SHEET_GAP + c * (tile + SHEET_GAP), SHEET_GAP + r * (tile + SHEET_GAP)))
    return sheet


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`auto` -> cuda when available (bfloat16 there), else cpu (float32)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def build_requests(cfg: GenerateConfig) -> list[GenerationRequest]:
    """The run's requests: the JSONL file's, or the one command-line prompt."""
    if cfg.requests is not None:
        return read_request_file(cfg.requests, cfg.sampling_settings(), first_seed=cfg.seed)
    images = _read_images(list(cfg.input_images), Path.cwd())
    return [GenerationRequest(cfg.prompt, input_images=images, seed=cfg.seed, **cfg.sampling_settings())]


def run_generate(cfg: GenerateConfig) -> GenerateSummary:
    """Loads the model, checks every request, generates them batch by batch and writes the outputs.

    Raises:
        GenerationRequestError: a bad request (nothing is generated).
        ModelSourceError, FileNotFoundError: the model cannot be found.
    """
    requests = build_requests(cfg)
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    bundle = load_generation_model(cfg.model, device=device, dtype=dtype)
    engine = GenerationEngine.from_bundle(bundle, limits=cfg.limits(), static_cache=cfg.compile or None,
                                          compile_step=cfg.compile)
    batches = engine.generate_in_batches(requests, max_images=cfg.batch_images)  # validates them all
    out = Path(cfg.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sheet_rows: list[list[Image.Image]] = []
    num_images = 0
    results_file = out / "results.jsonl"
    with results_file.open("w") as results:
        for index, result in batches:
            files = _write_images(out, index, result)
            num_images += len(files)
            results.write(json.dumps(_result_record(index, requests[index], result, files)) + "\n")
            if index < cfg.sheet_rows:
                sheet_rows.append(_input_images(requests[index]) + result.images)
            print(f"[{index + 1}/{len(requests)}] {requests[index].prompt[:60]!r}: {len(files)} images",
                  file=sys.stderr)
    sheet_path = out / "contact_sheet.png"
    contact_sheet(sheet_rows, bundle.image_size).save(sheet_path)
    return GenerateSummary(len(requests), num_images, out, sheet_path, results_file)


def _input_images(request: GenerationRequest) -> list[Image.Image]:
    return [Image.open(io.BytesIO(x)) if isinstance(x, (bytes, bytearray)) else x for x in request.input_images]


def _write_images(out: Path, index: int, result: GenerationResult) -> list[str]:
    files = []
    for j, image in enumerate(result.images):
        name = f"images/{index:04d}-{j:02d}.png"
        image.save(out / name)
        files.append(name)
    return files


def _result_record(index: int, request: GenerationRequest, result: GenerationResult, files: list[str]) -> dict:
    return {
        "index": index,
        "task": request.task,
        "prompt": request.prompt,
        "seed": result.seed,
        "parallel_size": request.parallel_size,
        "cfg_weight": request.cfg_weight,
        "cfg_weight2": request.cfg_weight2,
        "temperature": request.temperature,
        "top_k": request.top_k,
        "top_p": request.top_p,
        "images": files,
        "codes": result.codes.tolist(),
    }
