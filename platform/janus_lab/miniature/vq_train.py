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
    codes: str = "learned"
    """`learned`: the codebook is whatever reconstruction finds (codes may encode the whole
    scene); `per_patch`: every distinct 16 px patch of the world has its own code (a fixed,
    well-separated codebook, `spread_codebook`), the encoder learns to name it (cross-entropy
    over the cosine to every code, the search inference uses) and the decoder to paint it, so a
    patch's code never depends on what surrounds it. Half of each batch is then mosaics of the
    batch's own patches (contexts no scene has)."""
    code_scale: float = 20.0
    """`per_patch`: cosine -> logit scale of the code classifier."""
    encoder_only: bool = False
    """`per_patch` only: train the encoder to name each patch's code, nothing else (the decoder
    is not run: faster steps while naming lags behind painting)."""
    decoder_only: bool = False
    """Train only `post_quant_conv` and the decoder; the encoder and codebook stay frozen, so
    every image keeps its codes and a model trained on them stays valid. Needs `init`."""
    canonical_share: float = 0.4
    """Share of drawn scenes that are canonical (one large centred shape); the rest are one
    placed shape (2/3) or two (1/3), the scenes edits are made of."""
    precision: str = "auto"
    """`bf16` runs the forward under autocast with float32 master weights (1.5x faster on a CPU
    with AVX-512 BF16, as on a GPU); `fp32` runs it in float32; `auto` takes bf16 on CUDA and on
    CPUs whose oneDNN has bf16 kernels, else fp32 (on an AVX2-only CPU bf16 was 6x slower)."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.codes not in ("learned", "per_patch"):
            raise ValueError(f"codes must be learned or per_patch, got {self.codes!r}")
        if self.encoder_only and (self.decoder_only or self.codes != "per_patch"):
            raise ValueError("encoder_only=true needs codes=per_patch and excludes decoder_only")
        if self.decoder_only and not self.init:
            raise ValueError("decoder_only=true trains the decoder of an existing tokenizer: set init=FOLDER")
        if not 0.0 <= self.canonical_share <= 1.0:
            raise ValueError(f"canonical_share must be in [0, 1], got {self.canonical_share}")


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


def random_batch(rng: random.Random, batch_size: int, canonical_share: float | None = None) -> torch.Tensor:
    """A batch of freshly drawn scenes of the world (`canonical_share` None: the world's own mix)."""
    draw = (lambda: random_scene(rng)) if canonical_share is None else \
        (lambda: random_scene(rng, canonical=rng.random() < canonical_share))
    return scenes_to_tensor([draw().render(SIDE) for _ in range(batch_size)])


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


PATCH = 16
"""Pixels per side of the patch one code stands for (the Janus VQ downsamples 16x)."""


def patches_of(pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * N, C, 16, 16), patches in the codes' raster order."""
    b, c, h, w = pixels.shape
    grid = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # B, C, rows, cols, 16, 16
    return grid.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, PATCH, PATCH)


def mosaics(pixels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images tiled from the batch's own patches, each from a random scene and place: (mosaics
    shaped like `pixels`, and per mosaic patch the index into `patches_of(pixels)` it came from).
    A patch's context in a mosaic tells nothing about it, unlike in a scene."""
    b, c, h, w = pixels.shape
    rows, cols = h // PATCH, w // PATCH
    sources = torch.randint(b * rows * cols, (b * rows * cols,), generator=gen).to(pixels.device)
    tiles = patches_of(pixels)[sources].reshape(b, rows, cols, c, PATCH, PATCH)
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).contiguous(memory_format=torch.channels_last), sources


@torch.no_grad()
def spread_codebook(vq: JanusVQVAE, seed: int = 0, steps: int = 300) -> None:
    """Sets the codebook to unit vectors pushed apart (the nearest neighbour of a code at cosine
    ~0.8 in 8 dimensions, against ~0.99 for a codebook grown by reconstruction): a decoder tells
    well-separated codes apart easily, and the codes of `per_patch` are fixed by the patches,
    not learned. The same `seed` gives the same codebook, so a continued run keeps its codes."""
    weight = vq.quantize.embedding.weight
    points = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    optimizer = torch.optim.Adam([points], lr=0.01)
    with torch.enable_grad():
        for _ in range(steps):  # a soft maximum of each code's cosine to the others, lowered
            unit = F.normalize(points, dim=-1)
            cosine = unit @ unit.t() - 3 * torch.eye(len(unit))
            loss = torch.logsumexp(10 * cosine, dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    weight.copy_(F.normalize(points.detach(), dim=-1).to(weight))


class PatchVocabulary:
    """Every distinct 16 px patch of the world's scenes, numbered: the codes of `per_patch`."""

    def __init__(self, patches: dict[bytes, int]):
        self.index = patches

    @classmethod
    def of_world(cls, limit: int) -> "PatchVocabulary":
        from janus_lab.miniature.world import all_scenes

        index: dict[bytes, int] = {}
        scenes = all_scenes()
        for start in range(0, len(scenes), 512):
            pixels = scenes_to_tensor([scene.render(SIDE) for scene in scenes[start:start + 512]])
            for key in _patch_keys(pixels):
                index.setdefault(key, len(index))
        if len(index) > limit:
            raise ValueError(f"the world has {len(index)} distinct patches, more than the {limit} codes")
        return cls(index)

    def ids(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N) code of every patch of `pixels` (scenes of the world, or mosaics of them)."""
        keys = _patch_keys(pixels.detach().cpu())
        return torch.tensor([self.index[key] for key in keys], device=pixels.device).view(len(pixels), -1)


def _patch_keys(pixels: torch.Tensor) -> list[bytes]:
    exact = ((patches_of(pixels) + 1) * 127.5).round().to(torch.uint8).contiguous()
    return [patch.numpy().tobytes() for patch in exact]


def per_patch_forward(vq: JanusVQVAE, pixels: torch.Tensor, ids: torch.Tensor, scale: float, name: bool = True,
                      paint: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `per_patch` training forward: (reconstruction NCHW from the patches' own codes,
    cross-entropy of naming each patch's code by the normalised search, the codes the search
    picks (B, N)). `name=False` (a decoder-only run) skips the encoder: the loss is 0 and the
    codes are `ids`; `paint=False` (an encoder-only run) skips the decoder and returns `pixels`."""
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    naming, picked = torch.zeros((), device=pixels.device), ids
    if name:
        z = normalised_latents(vq, pixels)
        logits = scale * z.float() @ codebook.float().t()
        naming, picked = F.cross_entropy(logits.flatten(0, 1), ids.flatten()), logits.argmax(-1)
    if not paint:
        return pixels, naming, picked
    side = int(math.isqrt(ids.shape[1]))
    zq = codebook[ids]  # the decoder learns from the right codes, whatever the encoder names
    hidden = vq.post_quant_conv(zq.view(len(ids), side, side, -1).permute(0, 3, 1, 2))
    return vq.decoder(hidden), naming, picked


PURITY_SEED = 77


def purity_scenes(count: int = 256) -> torch.Tensor:
    """The fixed scenes `patch_purity` is logged on: enough that the world's common patches
    recur many times (on a few scenes most patches occur once and read as pure)."""
    return random_batch(random.Random(PURITY_SEED), count)


@torch.no_grad()
def patch_purity(vq: JanusVQVAE, pixels: torch.Tensor) -> float:
    """How local the codes are: over every 16 px patch of `pixels`, the share of occurrences
    that get the code most often given to that exact patch. 1.0: a patch's code depends on the
    patch alone (what a language model drawing patch by patch can learn to compose); low: the
    code also encodes the rest of the scene. One code for everything is pure too: read it beside
    the PSNR."""
    from janus_lab.model.vq import encode_vq_codes

    vq.eval()
    codes = encode_vq_codes(vq, pixels).flatten().tolist()
    keys = _patch_keys(pixels.cpu())
    seen: dict[bytes, dict[int, int]] = {}
    for key, code in zip(keys, codes):
        counts = seen.setdefault(key, {})
        counts[code] = counts.get(code, 0) + 1
    return sum(max(counts.values()) for counts in seen.values()) / len(codes)


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
    purity_pixels = purity_scenes().to(device)
    vocabulary = PatchVocabulary.of_world(vq.quantize.num_embeddings) if cfg.codes == "per_patch" else None
    draw = lambda n: random_batch(rng, n, cfg.canonical_share).to(  # noqa: E731
        device, memory_format=torch.channels_last)
    bf16 = resolve_precision(cfg.precision, device) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    vq.train()
    vq.requires_grad_(not cfg.decoder_only)
    if cfg.decoder_only:  # codes stay as they are: only the way back from them to pixels learns
        vq.encoder.eval()
        for module in (vq.post_quant_conv, vq.decoder):
            module.requires_grad_(True)
    if vocabulary is not None and not cfg.decoder_only:  # fixed, well-separated codes the encoder learns to name
        spread_codebook(vq)
        vq.quantize.requires_grad_(False)
    if cfg.encoder_only:
        vq.post_quant_conv.requires_grad_(False)
        vq.decoder.requires_grad_(False)
    trained = [p for p in vq.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=cfg.lr, betas=(0.9, 0.99))
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
        if vocabulary is not None:
            if not cfg.decoder_only:  # mosaics teach the encoder contexts no scene has
                pixels = torch.cat([pixels, mosaics(pixels, gen)[0]])
            ids = vocabulary.ids(pixels)
            with autocast:
                recon, naming, codes = per_patch_forward(vq, pixels, ids, cfg.code_scale,
                                                         name=not cfg.decoder_only, paint=not cfg.encoder_only)
            recon, naming = recon.float(), naming.float()
            loss = naming + (0 if cfg.encoder_only else F.mse_loss(recon, pixels))
        else:
            with autocast:
                recon, quant_terms, codes = reconstruct(vq, pixels, quantize)
            recon, quant_terms = recon.float(), quant_terms.float()
            loss = F.mse_loss(recon, pixels)
            if not cfg.decoder_only:
                loss = loss + cfg.commitment * quant_terms[1] * quantize + quant_terms[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        usage += torch.bincount(codes.flatten(), minlength=len(usage))
        restarted = 0
        if step % cfg.restart_every == 0:
            if step < cfg.restart_until * cfg.steps and not cfg.decoder_only and vocabulary is None:
                with torch.no_grad():
                    restarted = _restart_dead_codes(vq, usage, normalised_latents(vq, pixels), gen)
            usage.zero_()
        if step % cfg.log_every == 0 or step == cfg.steps:
            painted = not (vocabulary is not None and cfg.encoder_only)
            entry = {"step": step, "loss": round(loss.item(), 5),
                     "train_psnr": round(psnr(pixels, recon), 2) if painted else float("nan"),
                     "eval_psnr": round(evaluate_psnr(vq, eval_pixels), 2),
                     "purity": round(patch_purity(vq, purity_pixels), 3), "restarted": restarted,
                     **({"naming_loss": round(naming.item(), 4),
                         "named_right": round((codes == ids).float().mean().item(), 4)} if vocabulary is not None else {}),
                     "seconds": round(time.monotonic() - start, 1)}
            history.append(entry)
            log.info("step %(step)d loss %(loss).4f psnr train %(train_psnr).2f eval %(eval_psnr).2f dB "
                     "purity %(purity).3f restarted %(restarted)d codes (%(seconds).0f s)", entry)
            if on_log is not None:
                on_log(history)
            vq.train()
            if cfg.decoder_only:
                vq.encoder.eval()
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
