"""Generation speed: the batched engine against the loop a user would otherwise run.

    python benchmarks/generate.py --threads 1                       # CPU: debug model, 384 px = 576 codes
    python benchmarks/generate.py --preset janus-pro-1b --num-layers 2 --threads 1   # 1B shapes, 2 layers
    python benchmarks/generate.py --preset janus-pro-7b --device cuda --dtype bfloat16

For each batch size B (1, 4, 16, 64) and two rows, `t2i` (B text-to-image requests, B
different prompts) and `mix` (B/2 of them and B/2 edits with one input image), it times three
ways of producing B images, greedy by default so that codes can be compared:

- **published**: the published Janus / Janus-4o inference loop (`published_generate` in
  tests/test_generation.py): `parallel_size` images of ONE prompt per call, 2 rows per image
  (3 for edits), all rows prefilled, dynamic cache, eager. It cannot mix prompts, so it makes
  B images of the row's first prompt (a `mix` row: one call per task, B/2 images each); what
  it makes is what a user gets for one prompt, which is why it is the baseline to beat;
- **one-at-a-time**: the reference loop (`reference_generate`, the loop the engine is pinned
  against): one request, one image at a time, timed on `--reference-images` requests;
- **engine**: all B requests in one CFG batch (on CUDA: static cache + torch.compile, unless
  `--no-compile`; elsewhere the engine's default dynamic cache, or `--static-cache`).

It prints images/s of each, the engine's ratio over both baselines, and whether codes agree
where the requests are the same (the engine's first request against the published loop's
image, and every request the one-at-a-time loop ran). Codes are not decoded to pixels. With
`--device cuda` it also prints the memory-bandwidth bound of batch-1 latency: bytes of the
weights read per step (decoder layers, final norm, generation head and aligner) / HBM
bandwidth x N steps. Speed does not depend on weight values, so real-shape presets use random weights.
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
EDITS = ["blue", "a painting of a harbour at night", "larger", "two of them side by side"]


def load_references():
    """The two loops the equivalence tests pin the engine against (tests/test_generation.py), so
    the benchmark times exactly them: `reference_generate` (one request, one image at a time)
    and `published_generate` (the published loop: `parallel_size` images of one prompt per call)."""
    spec = importlib.util.spec_from_file_location("generation_reference", REPO / "tests" / "test_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_generate, module.published_generate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--image-size", type=int, default=384, help="debug preset only: 64 or 384 px")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="janus-pro-1b / -7b only: cut the language model to this many layers")
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="images per batch, comma-separated")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy, so codes are compared with both baselines; 1: the sampled "
                             "path is timed (the published loop then samples its own way)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="static cache + torch.compile for the step (default: on for cuda)")
    parser.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="engine decodes on a static KV cache (default: the engine's, on for cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth in GB/s (default: by GPU name)")
    parser.add_argument("--reference-images", type=int, default=2,
                        help="time the one-at-a-time loop on this many requests of each row (default 2); "
                             "it runs one image at a time, so its images/s does not depend on the batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablate", action="store_true",
                        help="instead of the table: the engine with each of its CPU changes off against on, "
                             "alternating in one process (length groups on the mix rows, the shared "
                             "unconditional prefill on the t2i rows: prefill alone and whole batch)")
    parser.add_argument("--no-length-groups", action="store_true",
                        help="engine: one batch padded to the longest prefix (what it did before length groups)")
    parser.add_argument("--no-shared-uncond", action="store_true",
                        help="engine: every request prefills its own unconditional row")
    return parser.parse_args(argv)


def build_bundle(args: argparse.Namespace):
    dtype = getattr(torch, args.dtype)
    if args.preset == "debug":
        return PRESETS["debug"](image_size=args.image_size, dtype=dtype, device=args.device)
    if args.num_layers:
        return PRESETS[args.preset](dtype=dtype, device=args.device, num_layers=args.num_layers)
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


def input_picture(seed: int, side: int):
    """A random RGB input image for the edit requests."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8).numpy())


def ablate(bundle, sizes: list[int], t2i, edits, repeats: int = 2) -> None:
    """Each engine change off vs on, alternating on the same batch; medians of `repeats`."""
    import statistics

    def engine(**flags) -> GenerationEngine:
        return GenerationEngine.from_bundle(bundle, limits=GenerationLimits(max_batch_images=max(sizes)), **flags)

    def prefill(eng: GenerationEngine, batch) -> tuple[int, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            cfg = eng.build_cfg_batch(eng.validate(batch))
            bundle.model.model.language_model(inputs_embeds=cfg.prefill_embeds, attention_mask=cfg.prefill_mask,
                                              position_ids=cfg.prefill_positions)
        return cfg.prefill_embeds.shape[0], time.perf_counter() - start

    print(f"{'change':>22} {'row':>4} {'B':>3} {'off s':>8} {'on s':>8} {'off/on':>7}")
    for size in sizes:
        cases = [("length groups", "mix", t2i(size // 2, 7000) + edits(size - size // 2, 8000), "length_groups"),
                 ("shared uncond", "t2i", t2i(size, 9000), "share_unconditional")]
        for name, row, batch, flag in cases:
            off, on = engine(**{flag: False}), engine()
            timings = {"off": [], "on": []}
            prefills = {}
            for _ in range(repeats):
                for label, eng in (("off", off), ("on", on)):
                    if flag == "share_unconditional":
                        prefills[label] = prefill(eng, batch)
                    start = time.perf_counter()
                    eng.generate(batch, decode_images=False)
                    timings[label].append(time.perf_counter() - start)
            a, b = statistics.median(timings["off"]), statistics.median(timings["on"])
            print(f"{name:>22} {row:>4} {size:>3} {a:>8.2f} {b:>8.2f} {a / b:>6.2f}x", flush=True)
            if prefills:
                (rows_off, s_off), (rows_on, s_on) = prefills["off"], prefills["on"]
                print(f"{'  prefill alone':>22} {row:>4} {size:>3} {s_off:>8.3f} {s_on:>8.3f} {s_off / s_on:>6.2f}x"
                      f"  ({rows_off} -> {rows_on} prefilled rows)", flush=True)


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
    reference_generate, published_generate = load_references()
    engine = GenerationEngine.from_bundle(bundle, limits=GenerationLimits(max_batch_images=max(sizes)),
                                          static_cache=static_cache, compile_step=compile_step,
                                          length_groups=not args.no_length_groups,
                                          share_unconditional=not args.no_shared_uncond)
    settings = {"temperature": args.temperature, "cfg_weight": 5.0, "cfg_weight2": 1.5}
    side = bundle.image_size

    def t2i(count: int, offset: int) -> list[GenerationRequest]:
        return [GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=args.seed + offset + i, **settings)
                for i in range(count)]

    def edits(count: int, offset: int) -> list[GenerationRequest]:
        # Every edit has its own input image, as different users' edits do.
        return [GenerationRequest(f"make it {EDITS[i % len(EDITS)]}", input_images=[input_picture(offset + i, side)],
                                  seed=args.seed + offset + i, **settings) for i in range(count)]

    if args.ablate:
        print(f"# {args.preset} ({bundle.image_size} px, N={n} codes): engine changes off vs on, greedy")
        ablate(bundle, [s for s in sizes if s > 1], t2i, edits)
        return 0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    mode = "static cache + torch.compile" if compile_step else \
        f"eager, {'static' if engine.static_cache else 'dynamic'} cache"
    changes = ", ".join(c for c, off in (("length groups", args.no_length_groups),
                                         ("shared uncond prefill", args.no_shared_uncond)) if not off) or "neither"
    print(f"# {args.preset} ({bundle.image_size} px, N={n} codes), {args.dtype} on {where}, engine {mode} "
          f"({changes}), temperature {args.temperature}")
    print("# published: the published batched loop, B images of ONE prompt per call (a mix: one call per task);")
    print("# one-at-a-time: the reference loop, one request, one image; engine: B requests, B different prompts")
    timed(lambda: reference_generate(bundle, t2i(1, 10_000)[0], 10_000), device)  # warm-up
    header = (f"{'row':>8} {'B':>3} {'published':>10} {'1-at-a-time':>11} {'engine':>8} {'vs publ.':>8} "
              f"{'vs 1-by-1':>9} {'eng s/batch':>11}  codes equal (publ. / 1-by-1)")
    print(header)
    rows = []
    for size in sizes:
        for kind in ("t2i", "mix"):
            if kind == "mix" and size < 2:
                continue
            half = size // 2
            batch = t2i(size, 1000 * size) if kind == "t2i" else t2i(half, 1000 * size) + edits(size - half, 2000 * size)
            timed(lambda: engine.generate(batch[:2], decode_images=False), device)  # warm-up
            shared = [GenerationRequest(r.prompt, input_images=r.input_images, parallel_size=count, seed=r.seed,
                                        **settings)
                      for r, count in ([(batch[0], size)] if kind == "t2i" else [(batch[0], half), (batch[half], size - half)])]
            publ_seconds, publ_codes = timed(lambda: [published_generate(bundle, r) for r in shared], device)
            checked = ([batch[0], batch[1 % size]] if kind == "t2i" else [batch[0], batch[half]])[:args.reference_images or 2]
            ref_seconds, ref_codes = timed(lambda: [reference_generate(bundle, r, r.seed) for r in checked], device)
            eng_seconds, results = timed(lambda: engine.generate(batch, decode_images=False), device)
            by_request = {id(r): result.codes.cpu() for r, result in zip(batch, results)}
            if args.temperature == 0:  # the published loop samples differently; greedy, codes must agree
                firsts = [batch[0]] if kind == "t2i" else [batch[0], batch[half]]
                publ_equal = sum(torch.equal(by_request[id(r)][0], codes[0]) for r, codes in zip(firsts, publ_codes))
                publ_note = f"{publ_equal}/{len(firsts)}"
            else:
                publ_note = "-"
            ref_equal = sum(torch.equal(by_request[id(r)], codes.cpu()) for r, codes in zip(checked, ref_codes))
            publ_rate, ref_rate, eng_rate = size / publ_seconds, len(checked) / ref_seconds, size / eng_seconds
            rows.append((kind, size, publ_rate, ref_rate, eng_rate, eng_seconds))
            print(f"{kind:>8} {size:>3} {publ_rate:>10.3f} {ref_rate:>11.3f} {eng_rate:>8.3f} "
                  f"{eng_rate / publ_rate:>7.2f}x {eng_rate / ref_rate:>8.2f}x {eng_seconds:>11.2f}  "
                  f"{publ_note} / {ref_equal}/{len(checked)}", flush=True)
    print("(images/s; `vs publ.` and `vs 1-by-1` are the engine's throughput over each baseline's)")
    if device.type == "cuda":
        weight_bytes = step_weight_bytes(bundle.model)
        bandwidth = hbm_gbps(device, args.hbm_gbps)
        if bandwidth is None:
            print("memory-bandwidth bound: unknown GPU, pass --hbm-gbps")
        else:
            bound = weight_bytes / (bandwidth * 1e9) * n
            batch1 = next((r for r in rows if r[:2] == ("t2i", 1)), None)
            print(f"memory-bandwidth bound (batch 1): {weight_bytes / 1e9:.2f} GB weights / {bandwidth:.0f} GB/s "
                  f"x {n} steps = {bound:.2f} s per image")
            if batch1:
                print(f"engine batch-1 latency {batch1[5]:.2f} s = {batch1[5] / bound:.2f}x the bound (target <= 1.5x)")
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
