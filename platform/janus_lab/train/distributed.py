"""Sharding, mixed precision and activation checkpointing, applied from one place.

Model code never imports FSDP: this module wraps a `GenerationObjective` with FSDP2
`fully_shard`, one unit per decoder layer and one at the root. The root must be the module
whose `forward` computes the loss, because FSDP gathers a unit's parameters only around that
unit's own forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import JanusForConditionalGeneration

from janus_lab.model.objective import GenerationObjective


def decoder_layers(objective: GenerationObjective) -> nn.ModuleList:
    """The language model's decoder layers (the unit of sharding and checkpointing)."""
    return objective.model.model.language_model.layers


def apply_activation_checkpointing(objective: GenerationObjective) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(objective)
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer, preserve_rng_state=False)


def mixed_precision_policy(device_type: str) -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 gradient reduction on GPUs; plain fp32 on CPU.

    CPU bf16 matmuls are slow and the debug runs there check correctness, not speed.
    """
    if device_type != "cuda":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(objective: GenerationObjective, device_type: str, reshard_after_forward: bool = True) -> FSDPModule:
    """Shards the objective: each decoder layer, then the root (everything else).

    Frozen parameters (the VQ tokenizer, optionally SigLIP) are sharded with the root; FSDP2
    handles a mix of frozen and trainable parameters in one unit.

    Returns:
        The same module, now an `FSDPModule`.
    """
    policy = mixed_precision_policy(device_type)
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in decoder_layers(objective):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters are needed again right after its forward (generation head in
    # backward), so keeping them gathered saves one all-gather per step.
    fully_shard(objective, reshard_after_forward=False, **kwargs)
    return objective


def prepare_for_training(model: JanusForConditionalGeneration, device: torch.device, *,
                         freeze_vision: bool = False, activation_checkpointing: bool = False) -> FSDPModule:
    """What every worker trains: the model's generation objective on `device`, sharded.

    The text head is frozen (image generation never reads it; training it would only cost
    optimizer memory), and so are SigLIP and its aligner with `freeze_vision`.

    Returns:
        The `GenerationObjective`, in training mode, as an `FSDPModule`.
    """
    model.lm_head.requires_grad_(False)
    if freeze_vision:
        model.model.vision_model.requires_grad_(False)
        model.model.aligner.requires_grad_(False)
    objective = GenerationObjective(model).to(device)
    if activation_checkpointing:
        apply_activation_checkpointing(objective)
    apply_fsdp(objective, device.type)
    return objective.train()
