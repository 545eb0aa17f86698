"""The per-worker training loop that Ray Train's `TorchTrainer` runs on every rank.

build model -> FSDP2 -> AdamW + warmup/cosine -> restore the latest checkpoint if any ->
stream micro-batches -> accumulate -> clip -> step -> report / validate / checkpoint ->
export in the Hugging Face layout at the end.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from janus_lab.config import from_dict
from janus_lab.data.stream import (DatasetLayout, StreamSpec, epoch_micro_batches, epoch_order_signature,
                                   micro_batches, read_split)
from janus_lab.model.builders import JanusBundle
from janus_lab.model.weights import build_bundle
from janus_lab.model.sequence import SequenceBuilder
from janus_lab.train.config import ExperimentConfig, TrainConfig
from janus_lab.train.distributed import prepare_for_training
from janus_lab.train.schedule import build_scheduler
from janus_lab.train.state import TrainState, data_geometry

# Dense bf16 peak FLOP/s of accelerators we know, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class DatasetTokenizerMismatch(ValueError):
    """The dataset's codes were made by another VQ tokenizer (or text tokenizer) than the model's."""


def check_dataset_tokenizer(bundle: JanusBundle, expected: str | None, uri: str) -> None:
    """Refuses to train on codes another tokenizer made: the loss would fall on wrong targets
    without any other sign. Checked on the workers, which build the model anyway; the driver
    would have to load the tokenizer (for 7B, download the checkpoint) just for this."""
    from janus_lab.data.ingest import vq_fingerprint

    if not expected:
        return
    found = vq_fingerprint(bundle.model, bundle.processor.tokenizer)
    if found != expected:
        raise DatasetTokenizerMismatch(
            f"{uri} was encoded by a VQ tokenizer with fingerprint {expected[:12]}, but this model's is "
            f"{found[:12]}: its codes would be wrong targets. Re-ingest it with this model "
            "(`python jobs/ingest.py model.preset=... / model.weights=...`) or train the model that encoded it")


@dataclass
class LoopPlan:
    """What the driver works out before any worker starts (it has the manifest)."""

    config: dict
    """The resolved experiment config, as a plain dict."""
    steps_per_epoch: int
    """Optimizer steps per epoch, equal on every rank."""
    total_steps: int
    """Optimizer steps of the whole run (epochs or max_steps, whichever ends first)."""
    val_rows: int
    """Validation rows (0: no validation)."""
    tracking_uri: str | None = None
    """MLflow server; None: no tracking."""
    run_id: str | None = None
    """MLflow run opened by the driver."""
    export_uri: str | None = None
    """Where the final Hugging Face export goes (local path or s3://)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Fixed prompts for the sample grid at each validation."""
    layout: DatasetLayout | None = None
    """The dataset's row groups and footers (`scan_layout`): what each worker reads its part from."""
    dataset_fingerprint: str | None = None
    """`vq_fingerprint` of the tokenizers that encoded the dataset (its manifest); None: not recorded."""

    def to_dict(self) -> dict:
        # Shallow: the layout travels as itself (Ray pickles it), footers included.
        return {f.name: getattr(self, f.name) for f in fields(self)}


def is_decayed(name: str, param: torch.Tensor, exempt: str) -> bool:
    """Whether AdamW decays a parameter, under `train.weight_decay_exempt`.

    Biases are the `.bias` tensors; norm weights are the other 1-D ones (Janus has no other
    1-D parameter).
    """
    if name.endswith(".bias"):
        return False
    return exempt == "biases" or param.ndim >= 2


def build_optimizer(objective: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: lr, betas and weight decay from `train`, two groups
    (decayed, exempt; see `is_decayed`). With LoRA the trainable parameters are the adapters, at
    `train.lora.lr` when it is set."""
    decay, exempt = [], []
    for name, param in objective.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param, train.weight_decay_exempt) else exempt).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    lr = train.lora.lr if train.lora.enabled and train.lora.lr else train.lr
    return torch.optim.AdamW(groups, lr=lr, betas=train.betas, eps=1e-8)


def gradient_sync(micro_batch: int, accumulation: int, every_micro_batch: bool) -> bool:
    """Whether FSDP reduce-scatters the gradients of this micro-batch (0-based, in the epoch).

    By default only the micro-batch that ends an accumulation window does: the others add into
    unsharded gradients, one reduce-scatter per step. `every_micro_batch` trades that buffer
    for a reduce-scatter per micro-batch (`train.reduce_every_micro_batch`).
    """
    return every_micro_batch or (micro_batch + 1) % accumulation == 0


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def trainable_parameters(objective: torch.nn.Module) -> int:
    return sum(p.numel() for p in objective.parameters() if p.requires_grad)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor


def training_memory(objective: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Bytes this rank holds for training beyond the weights: gradients and optimizer state, read
    from the tensors themselves (measured after a step, when both exist)."""
    gradients = sum(_local(p.grad).nbytes for p in objective.parameters() if p.grad is not None)
    state = sum(_local(value).nbytes for per_param in optimizer.state.values()
                for value in per_param.values() if torch.is_tensor(value))
    return {"gradient_bytes": float(gradients), "optimizer_state_bytes": float(state)}


def adapter_base(cfg: ExperimentConfig):
    """What an adapter trained by this run belongs to (`janus_adapter.json`)."""
    from janus_lab.model.adapters import AdapterBase

    return AdapterBase(preset=cfg.model.preset, weights=cfg.model.weights, image_size=cfg.model.image_size,
                       init_seed=cfg.train.seed)


def train_loop_per_worker(plan_dict: dict) -> None:
    """Entry point of every Ray Train worker (see `janus_lab.train.launch`)."""
    import ray.train
    import ray.train.torch

    plan = LoopPlan(**plan_dict)
    cfg = from_dict(ExperimentConfig, plan.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    if (cfg.model.weights or "").startswith("models:/") and plan.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(plan.tracking_uri)  # the registry the base is downloaded from
    bundle = build_bundle(cfg.model, init_seed=cfg.train.seed)
    check_dataset_tokenizer(bundle, plan.dataset_fingerprint, cfg.data.uri)
    lora = cfg.train.lora
    if lora.enabled:
        from janus_lab.model.adapters import apply_lora

        if device.type == "cuda":
            bundle.model.to(torch.bfloat16)  # the frozen base; the adapters train in float32
        apply_lora(bundle.model, lora, seed=cfg.train.seed)
    objective = prepare_for_training(bundle.model, device, freeze_vision=cfg.model.freeze_vision,
                                     activation_checkpointing=cfg.train.activation_checkpointing)
    num_params = trainable_parameters(objective)
    optimizer = build_optimizer(objective, cfg.train)
    scheduler = build_scheduler(optimizer, plan.total_steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
    state = TrainState(objective, optimizer, scheduler, rank, trainable_only=lora.enabled)
    order = epoch_order_signature(plan.layout, cfg.data.shuffle_seed, cfg.data.shuffle_window_rows)
    geometry = data_geometry(world, cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.seed, order)
    state.progress.geometry = geometry

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state.load(folder, geometry)
        if rank == 0:
            print(f"resumed from step {state.progress.step} (epoch {state.progress.epoch}, "
                  f"micro-batch {state.progress.micro_batches_in_epoch})", flush=True)

    from janus_lab.tracking import BufferedRunLogger

    # Buffered: an MLflow outage mid-run holds metrics back, never the training (docs/reliability.md).
    logger = BufferedRunLogger(plan.tracking_uri, plan.run_id, active=rank == 0) if plan.run_id else None
    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens, cfg.data.max_text_tokens)
    accumulation = cfg.train.gradient_accumulation_steps
    peak = _peak_flops(device)
    window = _Window()

    # The validation split is small and read at every evaluation: read it once. Every rank
    # evaluates all of it; ingest keeps it in row groups of its own, so that is all it fetches.
    val_rows = read_split(plan.layout, "val", retry=cfg.retry) if plan.val_rows else []

    def evaluate(step: int) -> dict:
        """Validation metrics (returned, logged by the caller) and a sample grid (logged here)."""
        metrics = validate(objective, builder, val_rows, cfg, device) if val_rows else {}
        if cfg.train.world_eval_samples:
            metrics.update(world_scores(objective, bundle, cfg.train.world_eval_samples, seed=cfg.train.seed,
                                        cfg_weight=cfg.train.world_eval_cfg_weight))
        if plan.sample_prompts:
            grid = sample_grid(objective, bundle, plan.sample_prompts, seed=cfg.train.seed)
            if logger:
                logger.log_image(grid, f"samples/step_{step:07d}.png")
        return metrics

    if state.progress.step == 0 and plan.val_rows and cfg.train.eval_at_start:
        initial = evaluate(0)
        if logger and initial:
            logger.log_metrics(initial, 0)
        if rank == 0 and initial:
            print(f"step 0 validation: {_fmt(initial)}", flush=True)

    progress = state.progress
    while progress.step < plan.total_steps:
        epoch = progress.epoch
        # Length grouping within one optimizer step's micro-batches only, so that it never
        # moves a sample from one step into another.
        spec = StreamSpec(epoch=epoch, rank=rank, world_size=world, micro_batch_size=cfg.train.micro_batch_size,
                          masking_seed=cfg.masking.seed, t2i_text_drop=cfg.masking.t2i_text_drop,
                          ti2i_image_drop=cfg.masking.ti2i_image_drop, group_window=accumulation,
                          shuffle_seed=cfg.data.shuffle_seed, shuffle_window_rows=cfg.data.shuffle_window_rows)
        steps_this_epoch = min(plan.steps_per_epoch, plan.total_steps - progress.step
                               + progress.micro_batches_in_epoch // accumulation)
        stream = epoch_micro_batches(plan.layout, builder, spec, skip=progress.micro_batches_in_epoch,
                                     limit=steps_this_epoch * accumulation, retry=cfg.retry)
        for batch in stream:
            batch = {k: v.to(device) for k, v in batch.items()}
            task_is_t2i = batch.pop("task_is_t2i")
            objective.set_requires_gradient_sync(gradient_sync(progress.micro_batches_in_epoch, accumulation,
                                                               cfg.train.reduce_every_micro_batch))
            out = objective(**batch)
            (out.loss / accumulation).backward()
            window.add(out, task_is_t2i, int(batch["attention_mask"].sum()))
            progress.micro_batches_in_epoch += 1
            if progress.micro_batches_in_epoch % accumulation:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in objective.parameters() if p.requires_grad], cfg.train.grad_clip)
            if isinstance(grad_norm, torch.distributed.tensor.DTensor):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            scheduler.step()
            memory = training_memory(objective, optimizer)  # while gradients and state both exist
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            step = progress.step
            last_of_run = step == plan.total_steps
            if step % cfg.train.report_every == 0 or last_of_run or step % cfg.train.checkpoint_every == 0:
                metrics = window.reduce(device, num_params, peak, world)
                metrics.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), epoch=epoch,
                               trainable_params=float(num_params), **memory)
                # eval_every=0 means at the end only.
                if plan.val_rows and (last_of_run or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
                    metrics.update(evaluate(step))
                if rank == 0:
                    print(f"step {step}/{plan.total_steps} {_fmt(metrics)}", flush=True)
                if logger:
                    logger.log_metrics(metrics, step)
                save = step % cfg.train.checkpoint_every == 0 or last_of_run
                _report(state, metrics | {"step": step}, save, cfg.retry)
            if progress.step >= plan.total_steps:
                break
        if progress.step < plan.total_steps:
            progress.epoch += 1
            progress.micro_batches_in_epoch = 0

    if plan.export_uri:
        kind = export(objective, bundle, plan.export_uri, rank, lora=lora if lora.enabled else None,
                      base=adapter_base(cfg))
        if logger:
            logger.set_tags({"export_uri": plan.export_uri, "export_kind": kind}
                            | ({"adapter_base": adapter_base(cfg).identity} if lora.enabled else {}))
    if logger:
        logger.flush()  # every step's metrics reach the run before the worker exits


def _report(state: TrainState, metrics: dict, save: bool, retry=None) -> None:
    """Reports metrics, with a checkpoint when `save`: written locally, then uploaded by
    `checkpoint_uploader` (retried through an S3 outage, refused whole on a full disk)."""
    import ray.train

    from janus_lab.train.upload import checkpoint_uploader

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="janus-ckpt-") as folder:
        state.save(folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{metrics['step']:07d}",
                         checkpoint_upload_fn=checkpoint_uploader(retry))


@torch.no_grad()
def validate(objective, builder: SequenceBuilder, val_rows: list[dict], cfg: ExperimentConfig, device) -> dict:
    """Held-out token NLL and accuracy per task.

    Every rank evaluates the same (small) validation set, so FSDP's collectives line up
    without padding batches; the numbers are identical on every rank.
    """
    objective.eval()
    sums = {"t2i": [0.0, 0.0, 0.0], "ti2i": [0.0, 0.0, 0.0]}  # nll, correct, tokens
    spec = StreamSpec(epoch=0, rank=0, world_size=1, micro_batch_size=cfg.train.micro_batch_size, group_window=16)
    for batch in micro_batches(val_rows, builder, spec):
        batch = {k: v.to(device) for k, v in batch.items()}
        is_t2i = batch.pop("task_is_t2i")
        out = objective(**batch)
        for task, rows in (("t2i", is_t2i), ("ti2i", ~is_t2i)):
            sums[task][0] += float(out.nll_per_sample[rows].sum())
            sums[task][1] += float(out.correct_per_sample[rows].sum())
            sums[task][2] += float(out.tokens_per_sample[rows].sum())
    objective.train()
    metrics = {}
    total = [0.0, 0.0, 0.0]
    for task, (nll, correct, tokens) in sums.items():
        if tokens:
            metrics[f"val_{task}_nll"] = nll / tokens
            metrics[f"val_{task}_accuracy"] = correct / tokens
        total = [a + b for a, b in zip(total, (nll, correct, tokens))]
    if total[2]:
        metrics["val_nll"] = total[0] / total[2]
        metrics["val_accuracy"] = total[1] / total[2]
    return metrics


@contextlib.contextmanager
def unsharded_engine(objective, bundle: JanusBundle):
    """A generation engine over the model being trained, its root parameters gathered meanwhile.

    Every rank must run the same generation (same requests and seeds), so the sharded layers'
    all-gathers line up; the root's own parameters are gathered for the duration, because the
    engine calls the model's submodules directly rather than the root's forward.
    """
    from janus_lab.generation import GenerationEngine

    engine = GenerationEngine(objective.model, bundle.processor.tokenizer, image_size=bundle.image_size,
                              num_image_tokens=bundle.num_image_tokens, static_cache=False)
    objective.unshard()
    try:
        with torch.no_grad():
            yield engine
    finally:
        objective.reshard()


def sample_grid(objective, bundle: JanusBundle, prompts: list[str], seed: int, per_prompt: int = 4):
    """Generates a few images per fixed prompt with the model being trained; one row per prompt."""
    from janus_lab.generation import GenerationRequest
    from janus_lab.generation.offline import contact_sheet

    requests = [GenerationRequest(prompt=prompt, parallel_size=per_prompt, seed=seed + index)
                for index, prompt in enumerate(prompts)]
    with unsharded_engine(objective, bundle) as engine:
        results = engine.generate(requests)
    return contact_sheet([result.images for result in results], tile=max(bundle.image_size, 64))


def world_scores(objective, bundle: JanusBundle, samples: int, seed: int, cfg_weight: float) -> dict:
    """The miniature world's held-out records generated by the model being trained and read by
    the exact scorer (`world_*` metrics)."""
    from janus_lab.miniature.evaluate import evaluate_world
    from janus_lab.miniature.score import world_metrics

    with unsharded_engine(objective, bundle) as engine:
        evaluation = evaluate_world(engine, samples=samples, seed=seed, cfg_weight=cfg_weight, cfg_weight2=cfg_weight)
    return world_metrics(evaluation.summary)


def export(objective, bundle: JanusBundle, uri: str, rank: int, lora=None, base=None) -> str:
    """Gathers the weights to rank 0 and writes them: the whole model in the Hugging Face layout,
    or with LoRA the adapter alone (PEFT's format, naming `base`) unless `lora.merge`.

    Returns:
        What was exported: `full`, `adapter` or `merged`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from janus_lab.model import adapters
    from janus_lab.model.weights import save_pretrained

    kind = "full" if lora is None else "merged" if lora.merge else "adapter"
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=kind == "adapter")
    full = get_model_state_dict(objective, options=options)
    if rank == 0:
        model_state = {k.removeprefix("model."): v for k, v in full.items()}
        if kind == "adapter":
            adapters.save_adapter(adapters.adapter_state(model_state), lora, base, uri)
        else:
            if kind == "merged":
                model_state = adapters.merged_state(model_state, bundle.model, lora)
            with torch.device("meta"):
                fresh = type(bundle.model)(bundle.model.config)
            fresh.load_state_dict(model_state, assign=True, strict=True)
            save_pretrained(JanusBundle(model=fresh, processor=bundle.processor, preset=bundle.preset), uri)
        print(f"exported the fine-tuned model ({kind}) to {uri}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return kind


class _Window:
    """Accumulates loss, accuracy and throughput between reports."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum = self.tokens = self.correct = self.samples = self.seq_tokens = 0.0
        self.started = time.perf_counter()

    def add(self, out, task_is_t2i, seq_tokens: int) -> None:
        self.loss_sum += float(out.loss.detach()) * int(out.num_tokens)
        self.tokens += int(out.num_tokens)
        self.correct += int(out.correct)
        self.samples += int(task_is_t2i.numel())
        self.seq_tokens += seq_tokens

    def reduce(self, device, num_params: int, peak: float | None, world: int) -> dict:
        elapsed = time.perf_counter() - self.started
        loss_sum, tokens, correct, samples, seq_tokens = _all_reduce_sum(
            [self.loss_sum, self.tokens, self.correct, self.samples, self.seq_tokens], device)
        metrics = {
            "loss": loss_sum / max(tokens, 1),
            "accuracy": correct / max(tokens, 1),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": seq_tokens / elapsed,
        }
        if peak:
            # 6 FLOPs per parameter per token (forward + backward), over every GPU's peak.
            metrics["mfu"] = 6 * num_params * seq_tokens / elapsed / (peak * world)
        self.reset()
        return metrics


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _fmt(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isnan(value):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " ".join(parts)

