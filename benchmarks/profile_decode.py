"""Where a decode step's time goes: the torch profiler over one engine batch, by part of the step.

    python benchmarks/profile_decode.py --threads 1                          # debug, 384 px, 16 T2I
    python benchmarks/profile_decode.py --threads 1 --mix                    # 8 T2I + 8 edits
    python benchmarks/profile_decode.py --threads 1 --preset janus-pro-1b --num-layers 2 --batch 4

Runs one untimed batch, then one under `torch.profiler`, with a `record_function` range around
each part of the model that a step runs (forward hooks on the modules): attention (projections,
rotary, attention over the cached prefix), MLP, norms, the generation head (the N-code way
output layer), the generation embedding of the sampled code, and the sampler (guidance, top-k/p,
softmax, the draw). It prints each part's share of the profiled wall time; what no range covers
is Python and framework overhead between them (the cache bookkeeping, mask slicing, the loop).
The prefill's share is inside the same parts (one call against N - 1 steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from janus_lab.generation import GenerationEngine, GenerationLimits, GenerationRequest
from janus_lab.model import PRESETS

PROMPTS = ["a red circle", "two small green triangles under a big yellow sun", "a cat",
           "a white house beside a river at the bottom", "many blue stars on a dark sky"]


def instrument(engine: GenerationEngine) -> None:
    """Wraps the step's parts in profiler ranges named `part:<name>` (this process only)."""
    from janus_lab.generation.sampling import GuidedSampler

    core = engine.model.model
    for layer in core.language_model.layers:
        for name, module in (("attention", layer.self_attn), ("mlp", layer.mlp),
                             ("norms", layer.input_layernorm), ("norms", layer.post_attention_layernorm)):
            _wrap_module(module, name)
    _wrap_module(core.language_model.norm, "norms")
    _wrap_module(core.generation_head, "generation head")
    engine.model.prepare_embeddings_for_image_generation = _ranged(
        engine.model.prepare_embeddings_for_image_generation, "embed code")
    GuidedSampler.__call__ = _ranged(GuidedSampler.__call__, "sampler")


def _ranged(fn, name):
    def wrapper(*args, **kwargs):
        with record_function(f"part:{name}"):
            return fn(*args, **kwargs)
    return wrapper


def _wrap_module(module, name):
    module.forward = _ranged(module.forward, name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    parser.add_argument("--num-layers", type=int, default=None, help="janus-pro-1b / -7b: layers kept")
    parser.add_argument("--batch", type=int, default=16, help="requests (default 16)")
    parser.add_argument("--mix", action="store_true", help="half of them edits with one input image")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = PRESETS[args.preset](image_size=384) if args.preset == "debug" else \
        PRESETS[args.preset](dtype=torch.float32, num_layers=args.num_layers)
    engine = GenerationEngine.from_bundle(bundle, limits=GenerationLimits(max_batch_images=args.batch))
    from PIL import Image

    picture = Image.new("RGB", (bundle.image_size, bundle.image_size), (200, 40, 40))
    requests = [GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=i, temperature=1.0,
                                  input_images=[picture] if args.mix and i % 2 else []) for i in range(args.batch)]
    engine.generate(requests[:2], decode_images=False)  # warm-up
    instrument(engine)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("phase:prefill+decode"):
            engine.generate(requests, decode_images=False)
    wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("part:"):
            totals[event.key[5:]] += event.cpu_time_total / 1e6  # inclusive of nested ops
    n = engine.num_image_tokens
    kind = "8 T2I + 8 edits" if args.mix else f"{args.batch} T2I"
    print(f"# {args.preset}{f' ({args.num_layers} layers)' if args.num_layers else ''}, {bundle.image_size} px "
          f"(N={n}), {kind}, {torch.get_num_threads()} threads: {wall:.2f} s for the batch (profiled)")
    covered = 0.0
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        covered += seconds
        print(f"  {name:<16} {seconds:7.2f} s  {100 * seconds / wall:5.1f}%")
    print(f"  {'rest (Python, cache and mask handling, loop)':<16} {wall - covered:7.2f} s  "
          f"{100 * (wall - covered) / wall:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
