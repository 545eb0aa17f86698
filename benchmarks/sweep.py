"""CFG-sweep scoring speed: a trial's batched engine calls against one request at a time.

    python benchmarks/sweep.py --threads 1                          # CPU: debug model, 64 px, 4 settings
    python benchmarks/sweep.py --image-size 384 --threads 1         # the real sequence length (576 codes)
    python benchmarks/sweep.py --preset janus-pro-7b --device cuda --dtype bfloat16 --batch-images 64

Scores every setting of a CFG grid (default cfg_weight {1, 5} x cfg_weight2 {1, 5}, temperature 1)
on the shipped held-out prompt set (sweeps/prompts/debug.jsonl: 3 text-to-image and 3 edit
prompts, `--parallel-size` images each) with the random test CLIP, three ways, in one process:

- baseline: one request at a time (one engine call per prompt and setting), then CLIP;
- per setting: what a CFG-sweep trial does, its prompt set in batched engine calls
  (`score_generation`), one setting after the other;
- whole grid: every setting's requests in the same batched calls (the engine mixes guidance
  weights per image), scored per setting afterwards.

Each mode runs once untimed (warm-up), then timed; it prints images/s, seconds and the ratio to
the baseline, and checks that every mode produced the same codes. Speed does not depend on
weight values, so the real-shape presets use random weights.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

from janus_lab.evaluation.clip import ClipScorer
from janus_lab.evaluation.generation_scores import score_generation, with_settings
from janus_lab.generation import GenerationEngine, GenerationLimits
from janus_lab.generation.offline import read_request_file
from janus_lab.model import PRESETS

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    parser.add_argument("--image-size", type=int, default=64, help="debug preset only: 64 or 384 px")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--cfg-weights", default="1,5")
    parser.add_argument("--cfg-weights2", default="1,5")
    parser.add_argument("--temperatures", default="1")
    parser.add_argument("--parallel-size", type=int, default=2, help="images per prompt")
    parser.add_argument("--batch-images", type=int, default=32, help="images per engine call")
    parser.add_argument("--prompts", default=str(REPO / "sweeps" / "prompts" / "debug.jsonl"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; 1 is steadier when shared")
    return parser.parse_args(argv)


def settings_grid(args: argparse.Namespace) -> list[dict]:
    values = [[float(v) for v in text.split(",")] for text in (args.cfg_weights, args.cfg_weights2, args.temperatures)]
    return [dict(zip(("cfg_weight", "cfg_weight2", "temperature"), combo)) for combo in itertools.product(*values)]


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kwargs = {"image_size": args.image_size} if args.preset == "debug" else {}
    bundle = PRESETS[args.preset](dtype=dtype, device=device, **kwargs)
    grid = settings_grid(args)
    requests = read_request_file(args.prompts)
    limits = GenerationLimits(max_parallel_size=args.parallel_size, max_batch_images=args.batch_images)
    engine = GenerationEngine.from_bundle(bundle, limits=limits)
    scorer = ClipScorer.load("debug", device)
    per_setting = [with_settings(requests, settings, args.parallel_size) for settings in grid]

    def one_at_a_time():
        codes = []
        for batch in per_setting:
            results = [engine.generate([request])[0] for request in batch]
            for request, result in zip(batch, results):
                scorer.clip_t(result.images, [request.prompt] * len(result.images))
            codes += [result.codes for result in results]
        return codes

    def setting_by_setting():
        return [result.codes for batch in per_setting
                for result in score_generation(engine, batch, scorer, args.batch_images).results]

    def whole_grid():
        everything = [request for batch in per_setting for request in batch]
        results = [result for _, result in engine.generate_in_batches(everything, max_images=args.batch_images)]
        for index, request in enumerate(everything):
            scorer.clip_t(results[index].images, [request.prompt] * len(results[index].images))
        return [result.codes for result in results]

    modes = [("baseline: one request at a time", one_at_a_time), ("per setting (a trial)", setting_by_setting),
             ("whole grid in one pass", whole_grid)]
    images = len(grid) * len(requests) * args.parallel_size
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# {args.preset} ({bundle.image_size} px, N={bundle.num_image_tokens} codes), {args.dtype} on {where}; "
          f"{len(grid)} settings x {len(requests)} prompts x {args.parallel_size} images = {images} images, "
          f"batches of up to {args.batch_images}; CLIP: random test CLIP (speed only)")
    print(f"{'mode':<34} {'seconds':>8} {'img/s':>8} {'vs baseline':>11} {'codes equal':>11}")
    baseline_seconds, baseline_codes = None, None
    for name, fn in modes:
        fn()  # warm-up
        seconds, codes = timed(fn, device)
        if baseline_seconds is None:
            baseline_seconds, baseline_codes = seconds, codes
        equal = sum(torch.equal(a.cpu(), b.cpu()) for a, b in zip(codes, baseline_codes))
        print(f"{name:<34} {seconds:>8.2f} {images / seconds:>8.2f} {baseline_seconds / seconds:>10.2f}x "
              f"{equal:>6}/{len(codes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
