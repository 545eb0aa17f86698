"""Mini VQ tokenizer training-step speed: bf16 autocast + channels-last against float32, one run.

    .venv/bin/python benchmarks/vq_train_step.py                 # CPU, batch 8, 2 threads
    .venv/bin/python benchmarks/vq_train_step.py --device cuda --batch 64

One Adam step of `janus_lab.miniature.vq_train`'s training forward (encoder -> normalised code
search -> straight-through -> decoder; pixel MSE + codebook + commitment) on freshly rendered
scenes of the world, in two modes:

- **ours** (`precision=bf16`, what `jobs/train_mini_vq.py`'s default `auto` picks where bf16
  runs fast): convolutions in bfloat16 under autocast over float32 master weights, tensors in
  channels-last (NHWC) memory format; the code search stays in float32.
- **baseline**: the same step in float32, NCHW, as transformers' modules run by default.

The modes alternate step by step after untimed warm-up steps, so machine load hits both. Scene
rendering happens outside the timed region.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import JanusVQVAE

from janus_lab.miniature.assets import mini_vq_config
from janus_lab.miniature.vq_train import random_batch, reconstruct


def make_step(device: torch.device, bf16: bool, seed: int):
    torch.manual_seed(seed)
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    vq = JanusVQVAE(mini_vq_config()).to(device, memory_format=fmt).train()
    optimizer = torch.optim.Adam(vq.parameters(), lr=3e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(pixels: torch.Tensor) -> None:
        pixels = pixels.to(device, memory_format=fmt)
        with autocast:
            recon, terms, _ = reconstruct(vq, pixels)
        loss = F.mse_loss(recon.float(), pixels) + terms.float().sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = {"ours (bf16 autocast, channels-last)": make_step(device, True, 0),
             "baseline (float32, NCHW)": make_step(device, False, 0)}
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(args.warmup + args.steps):
        pixels = random_batch(rng, args.batch)
        for name, step in modes.items():
            start = time.perf_counter()
            step(pixels)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
        print(f"step {i + 1}/{args.warmup + args.steps}", flush=True)
    print(f"\n{args.device}, batch {args.batch}, {args.threads} threads, {args.steps} timed steps per mode (median)")
    print("| mode | s/step | scenes/s |\n|---|---|---|")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {args.batch / seconds:.1f} |")
    ours, baseline = medians.values()
    print(f"\nours / baseline (scenes/s): {baseline / ours:.2f}x")


if __name__ == "__main__":
    main()
