"""Training-step speed: our step against the published script's, same model, same samples, one run.

    .venv/bin/python benchmarks/train_step.py                                  # CPU: debug model, 384 px, T2I, batch 4
    .venv/bin/python benchmarks/train_step.py --task ti2i
    .venv/bin/python benchmarks/train_step.py --preset janus-pro-1b --device cuda --batch 16
    .venv/bin/python benchmarks/train_step.py --preset janus-pro-7b --num-layers 8 --device cuda --batch 8

One optimizer step of `GenerationObjective` over `--batch` samples, in two modes:

- **ours**: the VQ codes are pre-computed (as the ingested shards store them); samples go through
  `micro_batches` (tokenise, mask, sort by length inside a window, collate) outside the timed
  region, then each step runs `--batch / --micro-batch` micro-batches of `--micro-batch` samples,
  clips and takes an AdamW step (`build_optimizer`, the training loop's).
- **baseline**, what the published `train_janus.py` does: one sample per forward/backward,
  accumulated `--batch` times; every sample padded to the longest sequence of its global batch;
  the target (and input) images VQ-encoded from pixels inside the step. Tokenising and padding
  (the published DataLoader's work, overlapped there) happen outside the timed region; only the
  codes are written into the prepared tensors inside it, on the device, without a host sync.

The modes alternate step by step (warm-up steps first, untimed), so a change of machine load
hits both. Throughput counts real tokens only (padding excluded). Model FLOPs per sample are
counted analytically: 6 x parameters x tokens for the decoder layers (plus 12 x layers x hidden x
length^2 for attention, PaLM's convention), the generation head over the supervised codes, the
generation aligner over the code inputs and, per input image, SigLIP and its aligner (6x when
trainable, 2x when frozen); the VQ encoding of the baseline is overhead, not model FLOPs. MFU =
those FLOPs / time / the bf16 dense peak (H100/H200 989e12, A100 312e12), printed on CUDA in bf16.

Precision: parameters and AdamW state in fp32, matmuls in `--dtype` through autocast (bf16 on
CUDA by default), as FSDP2's MixedPrecisionPolicy(param_dtype=bf16) does in training. One device,
no FSDP. The full 7B does not fit one 80 GB GPU with fp32 AdamW state (~16 bytes per parameter):
cut its depth with `--num-layers`. Speed does not depend on weight values: presets use random
weights, and "ours" random codes of the right shape.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from janus_lab.model import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    parser.add_argument("--num-layers", type=int, default=None, help="decoder layers (real-shape presets only)")
    parser.add_argument("--image-size", type=int, choices=[64, 384], default=384,
                        help="debug preset only: 64 (16 codes) or 384 (576 codes, shape-true)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype under autocast (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--task", choices=["t2i", "ti2i"], default="t2i",
                        help="t2i (~600 tokens at 384 px) or ti2i (~1,800 with one input image)")
    parser.add_argument("--two-input-every", type=int, default=0,
                        help="ti2i: every k-th sample has two input images (~2,900 tokens); 0 = none")
    parser.add_argument("--batch", type=int, default=4, help="samples per optimizer step, both modes")
    parser.add_argument("--micro-batch", type=int, default=None, help="ours: samples per forward (default --batch)")
    parser.add_argument("--group-window", type=int, default=16, help="ours: micro-batches sorted by length together")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps of each mode")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps of ours")
    parser.add_argument("--baseline-steps", type=int, default=2,
                        help="timed optimizer steps of the baseline (its steps are the slow ones)")
    parser.add_argument("--freeze-vision", action="store_true", help="freeze SigLIP + its aligner")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.micro_batch = args.micro_batch or args.batch
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.batch % args.micro_batch:
        parser.error(f"--batch {args.batch} is not a multiple of --micro-batch {args.micro_batch}")
    if args.preset == "debug" and args.num_layers is not None:
        parser.error("--num-layers applies to janus-pro-1b / janus-pro-7b")
    if args.preset != "debug" and args.image_size != 384:
        parser.error("the real-shape presets exist at 384 px only")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if min(args.steps, args.baseline_steps) < 1 or args.warmup < 0:
        parser.error("need --steps >= 1, --baseline-steps >= 1 and --warmup >= 0")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- timing and FLOPs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Span:
    """Times a region inside a step without a host sync (CUDA events); read it after the step's sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._pending: list = []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began

    def collect(self) -> float:
        """Seconds since the last collect (call after a synchronize)."""
        seconds = self.seconds + sum(start.elapsed_time(end) / 1000 for start, end in self._pending)
        self.seconds, self._pending = 0.0, []
        return seconds


@dataclass(frozen=True)
class FlopModel:
    """Analytic training FLOPs of one sample (forward + backward)."""

    decoder_params: int
    layers: int
    hidden: int
    head_params: int
    gen_aligner_params: int
    vision_params: int
    vision_layers: int
    vision_hidden: int
    vision_tokens: int
    vision_trainable: bool

    @classmethod
    def of(cls, model, vision_trainable: bool) -> "FlopModel":
        core = model.model
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        text, vision = model.config.text_config, model.config.vision_config
        return cls(count(core.language_model.layers), text.num_hidden_layers, text.hidden_size,
                   count(core.generation_head), count(core.generation_aligner),
                   count(core.vision_model) + count(core.aligner), vision.num_hidden_layers, vision.hidden_size,
                   (vision.image_size // vision.patch_size) ** 2, vision_trainable)

    def sample(self, length: int, supervised: int, code_inputs: int, input_images: int) -> float:
        flops = 6 * self.decoder_params * length + 12 * self.layers * self.hidden * length ** 2
        flops += 6 * self.head_params * supervised + 6 * self.gen_aligner_params * code_inputs
        passes = 6 if self.vision_trainable else 2  # a frozen encoder runs forward only
        t = self.vision_tokens
        per_image = passes * self.vision_params * t + 2 * passes * self.vision_layers * self.vision_hidden * t ** 2
        flops += input_images * per_image
        return float(flops)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense bf16 peak of a known GPU (the training loop's table); None elsewhere."""
    from janus_lab.train.loop import PEAK_BF16_FLOPS

    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# --------------------------------------------------------------------------- samples


def build(args: argparse.Namespace, device: torch.device):
    """The model (fp32 parameters), its objective and AdamW, as the training loop sets them up."""
    from janus_lab.model import PRESETS, GenerationObjective
    from janus_lab.train.config import TrainConfig
    from janus_lab.train.distributed import apply_activation_checkpointing
    from janus_lab.train.loop import build_optimizer

    torch.manual_seed(args.seed)
    if args.preset == "debug":
        bundle = PRESETS["debug"](image_size=args.image_size, seed=args.seed, dtype=torch.float32, device=device)
    else:
        bundle = PRESETS[args.preset](seed=args.seed, dtype=torch.float32, device=device, num_layers=args.num_layers)
    model = bundle.model
    model.lm_head.requires_grad_(False)  # image generation never reads the text head (as in training)
    if args.freeze_vision:
        model.model.vision_model.requires_grad_(False)
        model.model.aligner.requires_grad_(False)
    objective = GenerationObjective(model)
    if args.activation_checkpointing:
        apply_activation_checkpointing(objective)
    objective.train()
    optimizer = build_optimizer(objective, TrainConfig(lr=5e-6, weight_decay=0.1))
    return bundle, objective, optimizer


def sample_pool(args: argparse.Namespace, bundle, count: int) -> list[dict]:
    """`count` samples of the sample dataset's kind: prompt, pixels of every image, random codes."""
    from janus_lab.data.images import encode_png, letterbox
    from janus_lab.data.sample import sample_records
    from janus_lab.model import image_to_tensor

    side, n = bundle.image_size, bundle.num_image_tokens
    codebook = bundle.model.model.vqmodel.quantize.embedding.weight.shape[0]
    rng = np.random.default_rng(args.seed)
    t2i = count if args.task == "t2i" else 0
    records = sample_records(args.seed, num_t2i=t2i, num_ti2i=count - t2i, two_input_every=args.two_input_every)
    pool = []
    for record in records:
        inputs = [image.convert("RGB") for image in record.input_images()]
        pngs = []
        for image in inputs:  # stored input images, as the shards hold them (PNG at the model's side)
            pngs.append(encode_png(letterbox(image, side)))
        pool.append({
            "id": record.name, "task": record.task, "prompt": record.prompt,
            "output_codes": rng.integers(0, codebook, n).tolist(),
            "input_codes": [rng.integers(0, codebook, n).tolist() for _ in inputs],
            "input_pixels": pngs,
            "pixels": torch.stack([image_to_tensor(record.output_image(), side),
                                   *(image_to_tensor(image, side) for image in inputs)]),
        })
    return pool


@dataclass
class Step:
    """The prepared work of one optimizer step of one mode."""

    micro_batches: list[dict]
    tokens: int
    """Real (unpadded) tokens."""
    positions: int
    """Positions computed, padding included."""
    flops: float
    extras: list[dict] = field(default_factory=list)
    """Baseline: per sample, the pixels and where its codes go."""


def row_stats(batch: dict, pixels_per_row: list[int], flop_model: FlopModel) -> tuple[int, int, float]:
    real = batch["attention_mask"].sum(dim=1)
    code_inputs = (batch["gen_codes"] >= 0).sum(dim=1)
    supervised = (batch["labels"] >= 0).sum(dim=1)
    flops = sum(flop_model.sample(int(real[i]), int(supervised[i]), int(code_inputs[i]), pixels_per_row[i])
                for i in range(real.numel()))
    return int(real.sum()), batch["attention_mask"].numel(), flops


def our_steps(pool: list[dict], builder, args: argparse.Namespace, flop_model: FlopModel) -> list[Step]:
    """Micro-batches from `micro_batches` (the training stream's grouping), `batch / micro_batch` per step."""
    from janus_lab.data.stream import StreamSpec, micro_batches

    spec = StreamSpec(epoch=0, rank=0, world_size=1, micro_batch_size=args.micro_batch, masking_seed=args.seed,
                      t2i_text_drop=0.1, ti2i_image_drop=0.5, group_window=args.group_window)
    batches = list(micro_batches(pool, builder, spec))
    per_step = args.batch // args.micro_batch
    steps = []
    for start in range(0, len(batches) - per_step + 1, per_step):
        chosen = batches[start:start + per_step]
        tokens = positions = 0
        flops = 0.0
        for batch in chosen:
            batch.pop("task_is_t2i")
            images = _images_per_row(batch, builder.special.image)
            t, p, f = row_stats(batch, images, flop_model)
            tokens, positions, flops = tokens + t, positions + p, flops + f
        steps.append(Step(chosen, tokens, positions, flops))
    return steps


def _images_per_row(batch: dict, image_id: int) -> list[int]:
    """SigLIP input images of each row (each image is a run of N `<img>` slots)."""
    if "pixel_values" not in batch:
        return [0] * batch["input_ids"].shape[0]
    slots = (batch["input_ids"] == image_id).sum(dim=1)
    per_image = int(slots.sum()) // batch["pixel_values"].shape[0]
    return [int(s) // per_image for s in slots]


def baseline_steps(pool: list[dict], builder, args: argparse.Namespace, flop_model: FlopModel) -> list[Step]:
    """Per sample: a batch of one, padded to its global batch's longest, codes left as placeholders.

    The sample is tokenised with marker codes (output code i = i, input k's code i = (k+1)N + i), so
    the positions the real codes go to can be read back from the collated tensors.
    """
    from janus_lab.model import collate_samples, draw_mask_decision
    from janus_lab.model.sequence import IGNORE_INDEX

    n = builder.num_image_tokens
    steps = []
    for start in range(0, len(pool) - args.batch + 1, args.batch):
        prepared = []
        for row in pool[start:start + args.batch]:
            k = len(row["input_codes"])
            mask = draw_mask_decision(row["id"], 0, args.seed, row["task"], k, 0.1, 0.5)
            markers = [list(range((j + 1) * n, (j + 2) * n)) for j in range(k)]
            sample = builder.training_sample(row["prompt"], list(range(n)), markers, mask)
            prepared.append((row, sample))
        length = max(len(sample) for _, sample in prepared)  # padded to the global batch's longest
        micro, extras = [], []
        tokens = positions = 0
        flops = 0.0
        for row, sample in prepared:
            inputs = list(row["pixels"][1:])
            batch = collate_samples([sample], builder.special.pad, inputs if sample.num_input_images else ())
            batch = pad_to(batch, length, builder.special.pad)
            gen, labels = batch["gen_codes"][0], batch["labels"][0]
            where = {
                "target_inputs": torch.nonzero((gen >= 0) & (gen < n)).flatten(),
                "labels": torch.nonzero(labels != IGNORE_INDEX).flatten(),
                "inputs": [torch.nonzero((gen >= (j + 1) * n) & (gen < (j + 2) * n)).flatten() for j in range(k)],
            }
            batch["gen_codes"][0][gen >= 0] = 0  # placeholders until the step's VQ encoding
            batch["labels"][0][labels != IGNORE_INDEX] = 0
            micro.append(batch)
            extras.append({"pixels": row["pixels"], **where})
            t, p, f = row_stats(batch, [sample.num_input_images], flop_model)
            tokens, positions, flops = tokens + t, positions + p, flops + f
        steps.append(Step(micro, tokens, positions, flops, extras))
    return steps


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pads a collated batch's (B, L) tensors to `length`."""
    from janus_lab.model.sequence import IGNORE_INDEX, NO_CODE

    fill = {"input_ids": pad_id, "attention_mask": 0, "gen_codes": NO_CODE, "labels": IGNORE_INDEX}
    extra = length - batch["input_ids"].shape[1]
    for key, value in fill.items():
        batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
    return batch


# --------------------------------------------------------------------------- the two steps


class Runner:
    """Runs optimizer steps of either mode on one device."""

    def __init__(self, objective, optimizer, device: torch.device, dtype: torch.dtype):
        self.objective, self.optimizer, self.device = objective, optimizer, device
        self.dtype = dtype
        self.vq = Span(device)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _finish(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.objective.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def ours(self, step: Step) -> None:
        for batch in step.micro_batches:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with self.autocast():
                out = self.objective(**batch)
            (out.loss / len(step.micro_batches)).backward()
        self._finish()

    def baseline(self, step: Step) -> None:
        from janus_lab.model import encode_vq_codes

        model = self.objective.model
        for batch, extra in zip(step.micro_batches, step.extras):
            batch = {key: value.to(self.device) for key, value in batch.items()}
            with self.vq(), self.autocast():
                codes = encode_vq_codes(model, extra["pixels"].to(self.device))
            gen, labels = batch["gen_codes"], batch["labels"]
            gen[0, extra["target_inputs"].to(self.device)] = codes[0, :-1]
            labels[0, extra["labels"].to(self.device)] = codes[0]
            for j, where in enumerate(extra["inputs"]):
                if where.numel():  # empty when the mask left this input's VQ slot as <pad>
                    gen[0, where.to(self.device)] = codes[j + 1]
            with self.autocast():
                out = self.objective(**batch)
            (out.loss / len(step.micro_batches)).backward()
        self._finish()


@dataclass
class Tally:
    seconds: float = 0.0
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    positions: int = 0
    flops: float = 0.0
    vq_seconds: float = 0.0


def run(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    from janus_lab.model import SequenceBuilder

    bundle, objective, optimizer = build(args, device)
    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens)
    vision_trainable = any(p.requires_grad for p in objective.model.model.vision_model.parameters())
    flop_model = FlopModel.of(objective.model, vision_trainable)
    count = args.batch * (args.warmup + max(args.steps, args.baseline_steps))
    log(f"{args.preset}: {sum(p.numel() for p in objective.parameters()) / 1e6:.1f} M parameters "
        f"({sum(p.numel() for p in objective.parameters() if p.requires_grad) / 1e6:.1f} M trained), "
        f"{bundle.num_image_tokens} codes per image; preparing {count} {args.task} samples")
    pool = sample_pool(args, bundle, count)
    ours_plan = our_steps(pool, builder, args, flop_model)[:args.warmup + args.steps]
    # The baseline takes its global batches in data order (no length grouping).
    base_plan = baseline_steps(pool, builder, args, flop_model)[:args.warmup + args.baseline_steps]
    runner = Runner(objective, optimizer, device, getattr(torch, args.dtype))
    tallies = {"ours": Tally(), "baseline": Tally()}
    modes = {"ours": (ours_plan, runner.ours), "baseline": (base_plan, runner.baseline)}
    for index in range(args.warmup + max(args.steps, args.baseline_steps)):
        for name, (plan, step_fn) in modes.items():
            if index >= len(plan):
                continue
            step = plan[index]
            synchronize(device)
            began = time.perf_counter()
            step_fn(step)
            synchronize(device)
            seconds = time.perf_counter() - began
            vq = runner.vq.collect() if name == "baseline" else 0.0
            warm = index < args.warmup
            if not warm:
                tally = tallies[name]
                tally.seconds += seconds
                tally.steps += 1
                tally.samples += args.batch
                tally.tokens += step.tokens
                tally.positions += step.positions
                tally.flops += step.flops
                tally.vq_seconds += vq
            note = " (warm-up)" if warm else ""
            extra = f", {vq:.2f} s of it VQ encoding" if name == "baseline" else ""
            log(f"{name:8s} step {index + 1}/{len(plan)}{note}: {seconds:.3f} s, "
                f"{step.tokens / seconds:,.0f} tokens/s{extra}")
    return tallies, {"bundle": bundle, "peak": peak_flops(device, getattr(torch, args.dtype))}


def report(tallies: dict, info: dict, args: argparse.Namespace, device: torch.device) -> None:
    bundle, peak = info["bundle"], info["peak"]
    layers = bundle.model.config.text_config.num_hidden_layers
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print()
    print(f"train step: {args.preset} ({layers} layers), {where}, {args.dtype} compute, {args.task} at "
          f"{bundle.image_size} px ({bundle.num_image_tokens} codes/image), {args.batch} samples per optimizer step, "
          f"load average {os.getloadavg()[0]:.1f}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    layout = {"ours": f"{args.batch // args.micro_batch} x {args.micro_batch}", "baseline": f"{args.batch} x 1"}
    print(f"{'mode':10s} {'micro x B':>9s} {'steps':>5s} {'pad %':>6s} {'s/step':>8s} {'samples/s':>10s} "
          f"{'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    rates = {}
    for name, t in tallies.items():
        samples_s, tokens_s, flops_s = t.samples / t.seconds, t.tokens / t.seconds, t.flops / t.seconds
        rates[name] = (t.seconds / t.steps, samples_s, tokens_s, flops_s)
        pad = 100 * (1 - t.tokens / t.positions)
        mfu = f"{flops_s / peak:6.1%}" if peak else f"{'-':>6s}"
        print(f"{name:10s} {layout[name]:>9s} {t.steps:5d} {pad:6.1f} {t.seconds / t.steps:8.3f} {samples_s:10.2f} "
              f"{tokens_s:10,.0f} {flops_s / 1e12:8.4f} {mfu}")
    ours, base = rates["ours"], rates["baseline"]
    print(f"{'ours / baseline':22s} {'':6s} {base[0] / ours[0]:7.1f}x {ours[1] / base[1]:9.1f}x "
          f"{ours[2] / base[2]:9.1f}x {ours[3] / base[3]:7.1f}x")
    vq = tallies["baseline"].vq_seconds / tallies["baseline"].seconds
    print(f"baseline: {vq:.0%} of its step time is VQ encoding")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    tallies, info = run(args, device)
    report(tallies, info, args, device)


if __name__ == "__main__":
    main()
