"""The accelerator path: FSDP2 training steps and a batched generation, on CUDA.

The CUDA cases are skipped without a GPU (`pytest -m gpu` runs just them on a GPU machine). The
training step also runs on CPU with gloo: the same code (process group, `apply_fsdp`, AdamW,
clipping) that the CUDA case runs with NCCL and bf16 mixed precision, so it is exercised on every
machine. One process, world size 1: FSDP2 still shards, gathers and reduce-scatters through the
process group, which is what this checks; several ranks are `test_finetune.py`'s job.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from janus_lab.data.stream import StreamSpec, micro_batches
from janus_lab.generation import GenerationEngine, GenerationRequest
from janus_lab.model import SequenceBuilder, debug
from janus_lab.train.config import TrainConfig
from janus_lab.train.distributed import decoder_layers, prepare_for_training
from janus_lab.train.loop import build_optimizer, gradient_sync
from synthetic_shards import write_synthetic_dataset

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])


@pytest.fixture
def process_group(request):
    """A one-rank process group for the device under test, torn down afterwards."""
    device = request.param
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", 0)} if device == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    try:
        yield torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    finally:
        dist.destroy_process_group()


def training_batches(tmp_path, builder: SequenceBuilder, device: torch.device,
                     micro_batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of 4 samples from shards in the ingested layout, T2I and TI2I mixed."""
    import pyarrow.parquet as pq

    root = write_synthetic_dataset(tmp_path / "shards", num_t2i=4, num_ti2i=4, num_val=0)
    rows = [row for shard in sorted(root.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]
    rows = rows[2:6]  # two T2I rows, then two TI2I rows (one of them with two input images)
    spec = StreamSpec(epoch=0, rank=0, world_size=1, micro_batch_size=micro_batch_size)
    batches = list(micro_batches(rows, builder, spec))
    assert sum(batch["task_is_t2i"].tolist().count(True) for batch in batches) == 2
    return [{name: value.to(device) for name, value in batch.items() if name != "task_is_t2i"} for batch in batches]


def sharded_objective(device: torch.device, activation_checkpointing: bool = False):
    """The debug model set up as every training worker sets it up (`prepare_for_training`)."""
    torch.manual_seed(0)
    bundle = debug()
    return bundle, prepare_for_training(bundle.model, device, activation_checkpointing=activation_checkpointing)


@pytest.mark.parametrize("process_group", ["cpu", CUDA], indirect=True)
@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_fsdp_training_steps_lower_the_loss_on_their_batch(process_group, activation_checkpointing, tmp_path):
    device = process_group
    bundle, objective = sharded_objective(device, activation_checkpointing)
    optimizer = build_optimizer(objective, TrainConfig(lr=3e-3, weight_decay=0.0))
    [batch] = training_batches(tmp_path, SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens, 64),
                               device)

    compute_dtypes = []
    linear = next(m for m in decoder_layers(objective)[0].modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, output: compute_dtypes.append(output.dtype))

    losses, grad_norms = [], []
    for _ in range(3):  # the training loop's step: forward, backward, clip, AdamW
        out = objective(**batch)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        grad_norms.append(float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        assert out.loss.dtype == torch.float32  # the head's logits are upcast before the loss
    # Between steps the master weights are fp32 shards (DTensors); FSDP2 casts gathered copies
    # to bf16 for compute on CUDA only.
    trainable = [p for p in objective.parameters() if p.requires_grad]
    assert not objective.model.lm_head.weight.requires_grad  # image generation never reads the text head
    assert all(isinstance(p, DTensor) for p in trainable)
    assert all(p.dtype == torch.float32 and p.device.type == device.type for p in trainable)
    assert set(compute_dtypes) == {torch.bfloat16 if device.type == "cuda" else torch.float32}, compute_dtypes
    with torch.no_grad():
        after = objective(**batch).loss.item()

    assert all(math.isfinite(n) and n > 0 for n in grad_norms), grad_norms
    # A first loss near ln(codebook size) says the 16384-way head scores the supervised codes.
    assert abs(losses[0] - math.log(16384)) < 1.5, losses
    # Not step by step: bf16 rounding of the logits is as large as the first step's gain.
    assert losses[2] < losses[0] and after < losses[0] - 0.05, (losses, after)


@pytest.mark.parametrize("process_group", ["cpu", CUDA], indirect=True)
def test_lora_under_fsdp_trains_fp32_adapters_over_a_frozen_base_bf16_on_cuda(process_group, tmp_path):
    """What a LoRA worker runs: the base cast to bf16 on CUDA (fp32 on CPU), adapters in fp32,
    both in the same FSDP2 units; only the adapters change."""
    pytest.importorskip("peft")  # a bare GPU box's Python may lack it (benchmarks/gpu_suite.sh)
    from janus_lab.model.adapters import apply_lora
    from janus_lab.train.config import LoraConfig

    device = process_group
    torch.manual_seed(0)
    bundle = debug()
    if device.type == "cuda":
        bundle.model.to(torch.bfloat16)
    lora = LoraConfig(rank=4, lr=1e-2)
    apply_lora(bundle.model, lora, seed=0)
    objective = prepare_for_training(bundle.model, device)
    optimizer = build_optimizer(objective, TrainConfig(lr=1e-4, weight_decay=0.0, lora=lora))
    [batch] = training_batches(tmp_path, SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens, 64),
                               device)
    frozen = {name: p.full_tensor().clone() for name, p in objective.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(3):
        out = objective(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in objective.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    trainable = {name: p for name, p in objective.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, p in objective.named_parameters():
        if not p.requires_grad:
            assert p.dtype == base_dtype, name
            assert torch.equal(p.full_tensor(), frozen[name]), f"{name}: a frozen weight changed"
    assert all(math.isfinite(loss) for loss in losses) and losses[2] < losses[0], losses


@pytest.mark.parametrize("process_group", ["cpu", CUDA], indirect=True)
def test_reducing_every_micro_batch_gives_the_same_gradients_without_the_unsharded_buffer(process_group, tmp_path):
    device = process_group
    gradients, held_after_first = {}, {}
    for every_micro_batch in (False, True):
        bundle, objective = sharded_objective(device)
        builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens, 64)
        batches = training_batches(tmp_path / str(every_micro_batch), builder, device, micro_batch_size=2)
        assert len(batches) == 2  # one accumulation window of 2
        for index, batch in enumerate(batches):
            objective.set_requires_gradient_sync(gradient_sync(index, len(batches), every_micro_batch))
            (objective(**batch).loss / len(batches)).backward()
            if index == 0:
                # Sharded gradients exist after the first micro-batch only if it was reduce-scattered.
                held_after_first[every_micro_batch] = [p.grad is not None for p in objective.parameters()
                                                       if p.requires_grad]
        gradients[every_micro_batch] = {name: p.grad.full_tensor().float().cpu()
                                        for name, p in objective.named_parameters() if p.requires_grad}
    assert not any(held_after_first[False]) and all(held_after_first[True])
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if device.type == "cpu" else {"rtol": 2e-2, "atol": 1e-4}
    for name, expected in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], expected, **tolerance, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_generates_a_mixed_batch_on_cuda(dtype):
    from PIL import Image

    bundle = debug(device="cuda", dtype=dtype)
    engine = GenerationEngine.from_bundle(bundle)
    edit_input = Image.new("RGB", (64, 64), (200, 40, 40))
    requests = [GenerationRequest("a red circle", parallel_size=4, seed=1),
                GenerationRequest("make it blue", input_images=[edit_input], seed=2),
                GenerationRequest("a red circle", parallel_size=4, seed=1)]
    results = engine.generate(requests)
    assert [r.codes.shape for r in results] == [(4, 16), (1, 16), (4, 16)]
    assert all(r.codes.device.type == "cpu" and 0 <= int(r.codes.min()) and int(r.codes.max()) < 16384
               for r in results)
    assert torch.equal(results[0].codes, results[2].codes)  # same request, same seed, same batch
    assert [image.size for image in results[1].images] == [(64, 64)]
