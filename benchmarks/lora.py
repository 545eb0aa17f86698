"""LoRA against full fine-tuning, and serving an adapter against the base, on one model in one run.

    .venv/bin/python benchmarks/lora.py                          # CPU: the mini model, ranks 4 and 16
    .venv/bin/python benchmarks/lora.py --preset janus-pro-1b --device cuda --batch 16 --ranks 16 64

Training: one optimizer step of `GenerationObjective` over `--batch` samples (the training
stream's micro-batches, `benchmarks/train_step.py`'s "ours"), for full fine-tuning and for LoRA at
each rank (`janus_lab.model.adapters.apply_lora`, AdamW from the training loop's
`build_optimizer`). The modes take turns step by step, so a change of machine load hits all of
them. Printed per mode: trainable parameters, gradient and AdamW-state bytes (read from the
tensors after a step), the median step time and its ratio to full fine-tuning. On CUDA the LoRA
base is bfloat16, as in training.

Serving: `--requests` text-to-image requests generated as one batch by the base, by the base with
an adapter attached (unmerged, what the server runs with several adapters), and by the adapter
merged into the weights; ratios against the base.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from janus_lab.model import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    parser.add_argument("--num-layers", type=int, default=None, help="decoder layers (real-shape presets only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--task", choices=["t2i", "ti2i"], default="ti2i")
    parser.add_argument("--batch", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per mode")
    parser.add_argument("--requests", type=int, default=8, help="serving: requests in the batch")
    parser.add_argument("--repeats", type=int, default=3, help="serving: timed batches per model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def build_bundle(args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.float32):
    from janus_lab.model import PRESETS

    kwargs = {"num_layers": args.num_layers} if args.num_layers else {}
    bundle = PRESETS[args.preset](seed=args.seed, dtype=dtype, **kwargs)
    bundle.model.to(device)
    return bundle


class Mode:
    """One way of training the same model: full (rank 0) or LoRA at `rank`."""

    def __init__(self, args: argparse.Namespace, rank: int, device: torch.device):
        from janus_lab.model import GenerationObjective
        from janus_lab.model.adapters import apply_lora
        from janus_lab.train.config import LoraConfig, TrainConfig
        from janus_lab.train.loop import build_optimizer

        self.name = f"LoRA r={rank}" if rank else "full"
        lora = LoraConfig(rank=rank, lr=1e-3 if rank else None)
        base_dtype = torch.bfloat16 if rank and device.type == "cuda" else torch.float32
        self.bundle = build_bundle(args, device, base_dtype)
        model = self.bundle.model
        model.lm_head.requires_grad_(False)
        if rank:
            apply_lora(model, lora, seed=args.seed)
        self.objective = GenerationObjective(model).train()
        self.optimizer = build_optimizer(self.objective, TrainConfig(lr=5e-6, lora=lora))
        self.trainable = sum(p.numel() for p in self.objective.parameters() if p.requires_grad)
        self.device = device
        self.times: list[float] = []
        self.memory: dict[str, float] = {}

    def step(self, micro_batches: list[dict]) -> float:
        from janus_lab.train.loop import training_memory

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for batch in micro_batches:
            batch = {key: value.to(self.device) for key, value in batch.items() if key != "task_is_t2i"}
            with autocast:
                out = self.objective(**batch)
            (out.loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.objective.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - began
        self.memory = training_memory(self.objective, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return elapsed


def training(args: argparse.Namespace, device: torch.device) -> None:
    from janus_lab.data.stream import StreamSpec, micro_batches
    from janus_lab.model import SequenceBuilder
    from train_step import sample_pool

    modes = [Mode(args, rank, device) for rank in [0, *args.ranks]]
    bundle = modes[0].bundle
    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens, 256)
    pool = sample_pool(argparse.Namespace(seed=args.seed, task=args.task, two_input_every=0), bundle, args.batch)
    spec = StreamSpec(epoch=0, rank=0, world_size=1, micro_batch_size=args.batch, masking_seed=args.seed,
                      t2i_text_drop=0.1, ti2i_image_drop=0.5, group_window=1)
    step = list(micro_batches(pool, builder, spec))
    for mode in modes:
        mode.step([dict(b) for b in step])  # warm-up, untimed
    for _ in range(args.steps):
        for mode in modes:
            mode.times.append(mode.step([dict(b) for b in step]))
    full = statistics.median(modes[0].times)
    print(f"\ntraining: {args.preset}, {args.task}, batch {args.batch}, {device.type}, median of {args.steps} steps")
    print(f"{'mode':<12} {'trainable':>12} {'gradients':>12} {'AdamW state':>12} {'step s':>8} {'vs full':>8}")
    for mode in modes:
        median = statistics.median(mode.times)
        print(f"{mode.name:<12} {mode.trainable:>12,} {_mb(mode.memory['gradient_bytes']):>12} "
              f"{_mb(mode.memory['optimizer_state_bytes']):>12} {median:>8.3f} {full / median:>7.2f}x")


def serving(args: argparse.Namespace, device: torch.device) -> None:
    import tempfile

    from janus_lab.generation import GenerationEngine, GenerationRequest
    from janus_lab.model import adapters
    from janus_lab.train.config import LoraConfig

    rank = args.ranks[-1]
    cfg = LoraConfig(rank=rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trained = build_bundle(args, device, dtype)
    adapters.apply_lora(trained.model, cfg, seed=args.seed)
    with torch.no_grad():
        for name, param in trained.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)  # a trained adapter is not zero
    with tempfile.TemporaryDirectory() as folder:
        adapters.save_adapter(adapters.adapter_state(trained.model.state_dict()), cfg,
                              adapters.AdapterBase(args.preset, None, trained.image_size, args.seed), folder)
        base = build_bundle(args, device, dtype)
        unmerged = build_bundle(args, device, dtype)
        adapters.attach_adapter(unmerged.model, folder)
        merged = build_bundle(args, device, dtype)
        merged.model = adapters.attach_adapter(merged.model, folder).merge_and_unload()
    requests = [GenerationRequest(f"a red circle on a blue background {i}", seed=i) for i in range(args.requests)]
    engines = {"base": GenerationEngine.from_bundle(base), f"adapter r={rank}": GenerationEngine.from_bundle(unmerged),
               f"merged r={rank}": GenerationEngine.from_bundle(merged)}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.generate(requests[:1])  # warm-up
    for _ in range(args.repeats):
        for name, engine in engines.items():
            began = time.perf_counter()
            engine.generate(requests)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - began)
    reference = statistics.median(times["base"])
    print(f"\nserving: {args.requests} text-to-image requests in one batch, median of {args.repeats}")
    print(f"{'model':<16} {'batch s':>8} {'vs base':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<16} {median:>8.3f} {reference / median:>7.2f}x")


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    training(args, device)
    serving(args, device)


if __name__ == "__main__":
    main()
