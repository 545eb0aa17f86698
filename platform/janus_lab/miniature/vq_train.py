"""Training the miniature VQ tokenizer on rendered scenes of the world.

transformers' `JanusVQVAE.forward` decodes from argmin indices (no gradient reaches the encoder)
and searches unnormalised codes, so a training step has its own forward, matching what
`janus_lab.model.vq.encode_vq_codes` and `JanusVQVAE.decode` do at inference:

    encoder -> quant_conv -> L2-normalise -> nearest normalised code
    -> straight-through estimator -> post_quant_conv -> decoder

Loss: pixel MSE + codebook term + 0.25 x commitment term, both on the normalised vectors.
Codes unused over a window are restarted on latents of the current batch, so the codebook
covers the world's patches instead of collapsing onto a few colours.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import JanusVQVAE

from janus_lab.miniature.world import SIDE, random_scene

log = logging.getLogger(__name__)


@dataclass
class VQTrainConfig:
    """Settings of one VQ training run; the shipped tokenizer records the ones that made it."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    commitment: float = 0.25
    restart_every: int = 50
    """Steps between dead-code restarts (codes unused over the window get batch latents)."""
    restart_until: float = 0.8
    """Fraction of training after which codes are no longer restarted."""
    quantize_after: int = 0
    """Steps of plain autoencoding first (the decoder reads the unit latent itself): encoder and
    decoder agree on the scenes before codes are drawn; the codebook then starts on latents."""
    seed: int = 0
    log_every: int = 50
    device: str = "auto"
    """`cpu`, `cuda`, or `auto` (cuda when there is one). Scenes are drawn on the CPU either way."""
    init: str = ""
    """A folder with a `vq.safetensors` to continue from (training is long on a CPU: runs chain)."""
    reference_init: float = 20.0
    """Start from `conditioned_init` with this reference level (colour flows through the
    GroupNorms from step 0); 0 = transformers' plain init. Ignored with `init`."""
    precision: str = "auto"
    """`bf16` runs the forward under autocast with float32 master weights (1.5x faster on a CPU
    with AVX-512 BF16, as on a GPU); `fp32` runs it in float32; `auto` takes bf16 on CUDA and on
    CPUs whose oneDNN has bf16 kernels, else fp32 (on an AVX2-only CPU bf16 was 6x slower)."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where bf16 convolutions run fast (CUDA, or a CPU with bf16 instructions), else fp32."""
    if precision != "auto":
        return precision
    fast = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if fast else "fp32"


def scenes_to_tensor(images: list) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) floats in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def random_batch(rng: random.Random, batch_size: int) -> torch.Tensor:
    """A batch of freshly drawn scenes of the world."""
    return scenes_to_tensor([random_scene(rng).render(SIDE) for _ in range(batch_size)])


def normalised_latents(vq: JanusVQVAE, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, D) unit latents, the vectors the nearest-code search compares."""
    latent = vq.quant_conv(vq.encoder(pixels))
    return F.normalize(latent.permute(0, 2, 3, 1).flatten(1, 2), dim=-1)


def reconstruct(vq: JanusVQVAE, pixels: torch.Tensor, quantize: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training forward: (reconstruction NCHW, quantisation loss terms, codes (B, N))."""
    z = normalised_latents(vq, pixels)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    with torch.autocast(z.device.type, enabled=False):  # the search in float32, as at inference
        codes = (z.detach().float() @ codebook.t()).argmax(-1)
    zq = codebook[codes].to(z.dtype)
    codebook_loss = F.mse_loss(zq, z.detach())
    commitment_loss = F.mse_loss(z, zq.detach())
    if quantize:
        zq = z + (zq - z).detach()  # straight-through: the decoder's gradient reaches the encoder
    else:
        zq = z
    side = int(math.isqrt(z.shape[1]))
    hidden = vq.post_quant_conv(zq.view(z.shape[0], side, side, -1).permute(0, 3, 1, 2))
    return vq.decoder(hidden), torch.stack([codebook_loss, commitment_loss]), codes


def psnr(reference: torch.Tensor, image: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(image.clamp(-1, 1), reference).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def _restart_dead_codes(vq: JanusVQVAE, usage: torch.Tensor, latents: torch.Tensor, gen: torch.Generator) -> int:
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = latents.reshape(-1, latents.shape[-1])
    picks = pool[torch.randint(len(pool), (len(dead),), generator=gen).to(pool.device)]
    noise = 0.01 * torch.randn(picks.shape, generator=gen).to(pool.device)
    vq.quantize.embedding.weight[dead] = F.normalize(picks + noise, dim=-1)
    return len(dead)


@torch.no_grad()
def conditioned_init(vq: JanusVQVAE, reference: float) -> None:
    """Starts the tokenizer where absolute colour flows from the pixels to the latent and back.

    A Janus VQ normalises with GroupNorm(32). At 64 channels a group is two channels, which over
    a flat-colour scene is nearly an instance norm: the absolute colour is divided out, and the
    network learns colours only through patterns between regions. Measured on this world, plain
    init collapses blue, green and black backgrounds onto one latent within 40 steps (the
    residual branches' outputs, ~100x the colour-carrying skip, drown it), and the decoder then
    paints every dark background teal. Two changes, both only to the starting point:

    - encoder: the last convolution of every residual branch (and attention's output) starts at
      zero, downsampling and channel-changing shortcuts as identities, so at step 0 the encoder
      passes `conv_in`'s colour-linear features straight to the latent; the branches grow from
      there;
    - decoder, top level: channels come in mirrored pairs (second = `reference` - first) out of
      the upsampling convolution and every residual branch, so each group's mean is the
      constant `reference` / 2 and its GroupNorm is an affine map of the absolute value; the
      final norm's affine weights start at that map's inverse.

    Training is free to move all of it. Over 200 steps on fresh scenes (plain autoencoding,
    batch 8) this reached 11.1 dB and 57% of pixels nearest the right colour, against 9.5 dB
    and 42% with the decoder change alone (transformers' init, at base 32 and 120 steps: 8.6 dB
    and 24%).
    """
    from transformers.models.janus import modeling_janus as janus

    for module in vq.encoder.modules():
        if isinstance(module, janus.JanusVQVAEResnetBlock):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if hasattr(module, "nin_shortcut"):
                torch.nn.init.dirac_(module.nin_shortcut.weight)
                module.nin_shortcut.bias.zero_()
        elif isinstance(module, janus.JanusVQVAEAttnBlock):
            module.proj_out.weight.zero_()
            module.proj_out.bias.zero_()
        elif isinstance(module, janus.JanusVQVAEConvDownsample):
            torch.nn.init.dirac_(module.conv.weight)
            module.conv.bias.zero_()
    norm = vq.decoder.norm_out
    if norm.num_channels != 2 * norm.num_groups:
        raise ValueError("the mirrored-pair init needs two channels per group at the decoder's top level "
                         f"(base_channels 64), got {norm.num_channels}")

    def mirror(conv: torch.nn.Conv2d, offset: float) -> None:
        conv.weight[1::2] = -conv.weight[0::2]
        conv.bias[1::2] = offset - conv.bias[0::2]

    mirror(vq.decoder.up[-2].upsample.conv, reference)  # into the 64 x 64 level
    for block in vq.decoder.up[-1].block:
        mirror(block.conv2, 0.0)
    norm.weight[0::2], norm.bias[0::2] = reference / 2, reference / 2
    norm.weight[1::2], norm.bias[1::2] = 0, 0


def train_vq(vq: JanusVQVAE, cfg: VQTrainConfig, eval_pixels: torch.Tensor,
             on_log: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Trains `vq` in place on freshly drawn scenes; returns the logged history.

    Args:
        vq: the tokenizer to train (random init).
        cfg: the run's settings.
        eval_pixels: fixed held-out scenes, (B, 3, H, W) in [-1, 1], for the PSNR it logs.
        on_log: called with the history after each logged step (to save progress).
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    vq.to(device, memory_format=torch.channels_last)  # NHWC convolutions: faster on CPU and GPU
    eval_pixels = eval_pixels.to(device)
    draw = lambda n: random_batch(rng, n).to(device, memory_format=torch.channels_last)  # noqa: E731
    bf16 = resolve_precision(cfg.precision, device) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    vq.train()
    vq.requires_grad_(True)
    optimizer = torch.optim.Adam(vq.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    usage = torch.zeros(vq.quantize.num_embeddings, dtype=torch.long, device=device)
    history = []
    start = time.monotonic()
    if not cfg.init:
        if cfg.reference_init:
            conditioned_init(vq, cfg.reference_init)
        with torch.no_grad():  # codebook starts on latents of real scenes, not on random vectors
            _restart_dead_codes(vq, usage, normalised_latents(vq, draw(cfg.batch_size)), gen)
    for step in range(1, cfg.steps + 1):
        pixels = draw(cfg.batch_size)
        quantize = step > cfg.quantize_after
        if step == cfg.quantize_after + 1 and cfg.quantize_after:
            with torch.no_grad():  # every code restarts on a latent of the trained encoder
                usage.zero_()
                _restart_dead_codes(vq, usage, normalised_latents(vq, draw(8 * cfg.batch_size)), gen)
        with autocast:
            recon, quant_terms, codes = reconstruct(vq, pixels, quantize)
        recon, quant_terms = recon.float(), quant_terms.float()
        loss = F.mse_loss(recon, pixels) + cfg.commitment * quant_terms[1] * quantize + quant_terms[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        usage += torch.bincount(codes.flatten(), minlength=len(usage))
        restarted = 0
        if step % cfg.restart_every == 0:
            if step < cfg.restart_until * cfg.steps:
                with torch.no_grad():
                    restarted = _restart_dead_codes(vq, usage, normalised_latents(vq, pixels), gen)
            usage.zero_()
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, "loss": round(loss.item(), 5), "train_psnr": round(psnr(pixels, recon), 2),
                     "eval_psnr": round(evaluate_psnr(vq, eval_pixels), 2), "restarted": restarted,
                     "seconds": round(time.monotonic() - start, 1)}
            history.append(entry)
            log.info("step %(step)d loss %(loss).4f psnr train %(train_psnr).2f eval %(eval_psnr).2f dB "
                     "restarted %(restarted)d codes (%(seconds).0f s)", entry)
            if on_log is not None:
                on_log(history)
            vq.train()
    vq.eval()
    vq.requires_grad_(False)
    vq.to("cpu", memory_format=torch.contiguous_format)
    return history


@torch.no_grad()
def round_trip(vq: JanusVQVAE, pixels: torch.Tensor) -> torch.Tensor:
    """Encode with the normalised search and decode, exactly as the platform does."""
    from janus_lab.model.vq import encode_vq_codes

    vq.eval()
    codes = encode_vq_codes(vq, pixels)
    return vq.decode(codes)


def evaluate_psnr(vq: JanusVQVAE, pixels: torch.Tensor) -> float:
    """PSNR of the inference round trip (encode_vq_codes -> decode) on `pixels`."""
    return psnr(pixels, round_trip(vq, pixels))
