"""Generation speed: the batched engine against the reference loop, same model, same requests.

    python benchmarks/generate.py                                   # CPU: debug model, 384 px = 576 codes
    python benchmarks/generate.py --preset janus-pro-7b --device cuda --dtype bfloat16

For each batch size (1, 4, 16 images: that many text-to-image requests with different prompts,
cfg_weight 5, temperature 1, one seed each) it times

- the reference loop (`reference_generate` in tests/test_generation.py, the loop the engine is
  pinned against: one request at a time, no padding, a dynamic cache), and
- the engine: all requests in one CFG batch (on CUDA: static cache + torch.compile, unless
  `--no-compile`; elsewhere the engine's default dynamic cache, or `--static-cache`),

after one untimed warm-up of each, and prints images/s, per-image latency (reference: one image's
own loop; engine: the whole batch, since every image of a batch finishes together) and the
engine/reference ratios. `--reference-images K` times the reference on the first K requests of
each batch only (its images/s is per request, so it holds for any batch size; codes are compared
on those K). Codes are not decoded to pixels by either. With `--device cuda` it also
prints the memory-bandwidth bound of batch-1 latency: bytes of the weights read per step
(decoder layers, final norm, generation head and aligner) / HBM bandwidth x N steps.
Speed does not depend on weight values, so the real-shape presets use random weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from janus_lab.generation import GenerationEngine, GenerationLimits, GenerationRequest
from janus_lab.model import PRESETS

REPO = Path(__file__).resolve().parents[1]

# Peak HBM bandwidth in GB/s by device name (NVIDIA data sheets); --hbm-gbps overrides.
HBM_GBPS = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
            "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864}

PROMPTS = ["a red circle", "two small green triangles under a big yellow sun",
           "a white house beside a river at the bottom", "a cat", "many blue stars on a dark sky",
           "a tiny bird on a large gray bridge in the middle of a city street"]


def load_reference():
    """The reference loop from the equivalence tests, so the benchmark times the pinned loop."""
    spec = importlib.util.spec_from_file_location("generation_reference", REPO / "tests" / "test_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_generate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--image-size", type=int, default=384, help="debug preset only: 64 or 384 px")
    parser.add_argument("--batch-sizes", default="1,4,16", help="images per batch, comma-separated")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="static cache + torch.compile for the step (default: on for cuda)")
    parser.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="engine decodes on a static KV cache (default: the engine's, on for cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth in GB/s (default: by GPU name)")
    parser.add_argument("--reference-images", type=int, default=None,
                        help="time the reference loop on at most this many requests of each batch (default: all); "
                             "it runs one request at a time, so its images/s does not depend on the batch size")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_bundle(args: argparse.Namespace):
    dtype = getattr(torch, args.dtype)
    if args.preset == "debug":
        return PRESETS["debug"](image_size=args.image_size, dtype=dtype, device=args.device)
    return PRESETS[args.preset](dtype=dtype, device=args.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def step_weight_bytes(model) -> int:
    """Bytes of the weights every decode step reads (token embeddings are a lookup: not counted)."""
    core = model.model
    modules = [core.language_model.layers, core.language_model.norm, core.generation_head, core.generation_aligner]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def hbm_gbps(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name(device)
    for key, value in HBM_GBPS.items():  # most specific names first
        if key in name:
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compile_step = device.type == "cuda" if args.compile is None else args.compile
    static_cache = compile_step or args.static_cache
    bundle = build_bundle(args)
    n = bundle.num_image_tokens
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    reference_generate = load_reference()
    engine = GenerationEngine.from_bundle(bundle, limits=GenerationLimits(max_batch_images=max(sizes)),
                                          static_cache=static_cache, compile_step=compile_step)

    def requests(count: int, offset: int) -> list[GenerationRequest]:
        return [GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=args.seed + offset + i) for i in range(count)]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    mode = "static cache + torch.compile" if compile_step else \
        f"eager, {'static' if engine.static_cache else 'dynamic'} cache"
    print(f"# {args.preset} ({bundle.image_size} px, N={n} codes), {args.dtype} on {where}, engine {mode}")
    timed(lambda: reference_generate(bundle, requests(1, 10_000)[0], 10_000), device)  # warm-up
    print(f"{'batch':>5} {'ref img/s':>10} {'eng img/s':>10} {'speedup':>8} "
          f"{'ref s/img':>10} {'eng s/img':>10} {'lat ratio':>9} {'codes equal':>11}")
    rows = []
    for size in sizes:
        batch = requests(size, 1000 * size)
        timed(lambda: engine.generate(requests(size, 500_000 + size), decode_images=False), device)  # warm-up
        checked = batch[:min(size, args.reference_images or size)]
        ref_seconds, ref_codes = timed(lambda: [reference_generate(bundle, r, r.seed) for r in checked], device)
        eng_seconds, results = timed(lambda: engine.generate(batch, decode_images=False), device)
        equal = sum(torch.equal(r.codes.cpu(), c.cpu()) for r, c in zip(results, ref_codes))
        ref_rate, eng_rate = len(checked) / ref_seconds, size / eng_seconds
        ref_latency, eng_latency = ref_seconds / len(checked), eng_seconds
        rows.append((size, ref_rate, eng_rate, ref_latency, eng_latency))
        print(f"{size:>5} {ref_rate:>10.3f} {eng_rate:>10.3f} {eng_rate / ref_rate:>7.2f}x "
              f"{ref_latency:>10.3f} {eng_latency:>10.3f} {eng_latency / ref_latency:>8.2f}x "
              f"{equal:>6}/{len(checked)}")
    if device.type == "cuda":
        weight_bytes = step_weight_bytes(bundle.model)
        bandwidth = hbm_gbps(device, args.hbm_gbps)
        if bandwidth is None:
            print("memory-bandwidth bound: unknown GPU, pass --hbm-gbps")
        else:
            bound = weight_bytes / (bandwidth * 1e9) * n
            batch1 = next((r for r in rows if r[0] == 1), None)
            print(f"memory-bandwidth bound (batch 1): {weight_bytes / 1e9:.2f} GB weights / {bandwidth:.0f} GB/s "
                  f"x {n} steps = {bound:.2f} s per image")
            if batch1:
                print(f"engine batch-1 latency {batch1[4]:.2f} s = {batch1[4] / bound:.2f}x the bound (target <= 1.5x)")
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
