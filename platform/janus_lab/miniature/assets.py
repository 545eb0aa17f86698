"""The shipped miniature: where its files live, how they are built and how they load.

`weights/vq.safetensors` is the VQ tokenizer (`jobs/train_mini_vq.py`), `weights/base/` the base
model pre-trained on text-to-image only (`jobs/pretrain_mini.py`). Each has a JSON beside it
with the command, seed and figures that made it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import JanusVQVAE, JanusVQVAEConfig

from janus_lab.miniature.vq_train import VQTrainConfig, random_batch, round_trip, train_vq
from janus_lab.miniature.world import SIDE

MINI_DIR = Path(__file__).resolve().parent / "weights"
VQ_FILE = "vq.safetensors"
EVAL_SCENES_SEED = 2024
EVAL_SCENES = 32

MINI_VQ = {
    "embed_dim": 8,
    "num_embeddings": 2048,
    "base_channels": 64,
    "channel_multiplier": [1, 1, 1, 1, 2],
    "num_res_blocks": 1,
    "latent_channels": 64,
}
"""The mini VQ tokenizer: Janus's VQ architecture, slimmed for 64 px scenes on a CPU (the world
has under a thousand distinct 16 x 16 patches, so 2048 codes cover it)."""


def mini_vq_config() -> JanusVQVAEConfig:
    return JanusVQVAEConfig(**MINI_VQ, num_patches=SIDE // 16)


def eval_pixels() -> torch.Tensor:
    """The fixed scenes every reconstruction figure of the mini VQ is measured on."""
    return random_batch(random.Random(EVAL_SCENES_SEED), EVAL_SCENES)


def load_mini_vq(folder: str | Path = MINI_DIR) -> JanusVQVAE:
    """The shipped (or a freshly trained) mini VQ tokenizer, float32, frozen."""
    vq = JanusVQVAE(mini_vq_config())
    state = {k: v.float() for k, v in load_file(str(Path(folder) / VQ_FILE)).items()}
    vq.load_state_dict(state)
    vq.eval().requires_grad_(False)
    return vq


BASE_FILE = "base.safetensors"
def load_mini_weights(model, folder: str | Path = MINI_DIR, language_model: bool = True) -> None:
    """Loads the shipped VQ tokenizer (and, unless told not to, the base model) into a mini model.

    Raises:
        FileNotFoundError: a file is missing (train it with the job its JSON names).
    """
    folder = Path(folder)
    vq_file = folder / VQ_FILE
    if not vq_file.exists():
        raise FileNotFoundError(f"{vq_file} is missing: train it with `python jobs/train_mini_vq.py`")
    model.model.vqmodel.load_state_dict({k: v.float() for k, v in load_file(str(vq_file)).items()})
    if language_model:
        load_base(model, folder)
    model.model.vqmodel.eval().requires_grad_(False)


def load_base(model, folder: str | Path = MINI_DIR) -> None:
    """Loads `base.safetensors` (everything but the VQ tokenizer) from `folder` into a mini model."""
    base_file = Path(folder) / BASE_FILE
    if not base_file.exists():
        raise FileNotFoundError(f"{base_file} is missing: pre-train it with `python jobs/pretrain_mini.py`")
    state = {k: v.float() for k, v in load_file(str(base_file)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("model.vqmodel.")]
    if missing or unexpected:
        raise ValueError(f"{base_file} does not fit the mini model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")


BASE_EVAL = {"samples": 4, "seed": 0, "cfg_weight": 2.0, "temperature": 1.0}
"""How the shipped base's held-out text-to-image score is measured (and reproduced by a test)."""


def base_t2i_scores(model, processor) -> dict:
    """The held-out text-to-image prompts generated with `BASE_EVAL`'s settings and scored."""
    from janus_lab.generation import GenerationEngine
    from janus_lab.miniature.evaluate import evaluate_world
    from janus_lab.miniature.world import evaluation_records

    records = [r for r in evaluation_records() if r.task == "t2i"]
    engine = GenerationEngine(model, processor.tokenizer, image_size=SIDE, num_image_tokens=16, static_cache=False)
    settings = dict(BASE_EVAL)
    result = evaluate_world(engine, records, samples=settings.pop("samples"), seed=settings.pop("seed"), **settings)
    return {"t2i": result.summary["t2i"], "chance_t2i": result.chance["t2i"], "prompts": len(records), **BASE_EVAL}


def finalize_base(folder: str | Path) -> dict:
    """Scores a written base (as stored, float16) on the held-out text-to-image prompts and
    records the figure in `base.json`, which `tests/test_miniature.py` reproduces."""
    from janus_lab.model.builders import mini_init

    folder = Path(folder)
    bundle = mini_init()
    load_base(bundle.model, folder)
    record = json.loads((folder / "base.json").read_text())
    record["heldout"] = base_t2i_scores(bundle.model.eval(), bundle.processor)
    (folder / "base.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def save_base(model, folder: str | Path, record: dict) -> None:
    """Writes a mini model's weights, all but the VQ tokenizer, as float16 (`base.safetensors`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.startswith("model.vqmodel.")}
    save_file(state, str(folder / BASE_FILE))
    (folder / "base.json").write_text(json.dumps(record, indent=2) + "\n")


def save_vq(vq: JanusVQVAE, folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in vq.state_dict().items()},
              str(folder / VQ_FILE))
    (folder / "vq.json").write_text(json.dumps(record, indent=2) + "\n")


def reconstruction_sheet(vq: JanusVQVAE, pixels: torch.Tensor, columns: int = 16) -> Image.Image:
    """Originals (odd rows) above their round-trip reconstructions (even rows)."""
    recon = round_trip(vq, pixels).clamp(-1, 1)
    to_image = lambda t: Image.fromarray(((t.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    rows = (len(pixels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * SIDE, 2 * rows * SIDE), (255, 255, 255))
    for i in range(len(pixels)):
        x, y = (i % columns) * SIDE, (i // columns) * 2 * SIDE
        sheet.paste(to_image(pixels[i]), (x, y))
        sheet.paste(to_image(recon[i]), (x, y + SIDE))
    return sheet


def train_and_save_vq(out: str | Path, **settings) -> dict:
    """Trains a mini VQ with `settings` (VQTrainConfig fields) and writes it to `out`; the last
    step is always logged, so the file written last holds the final weights."""
    out = Path(out)
    cfg = VQTrainConfig(**settings)
    torch.manual_seed(cfg.seed)
    vq = load_mini_vq(cfg.init).train().requires_grad_(True) if cfg.init else JanusVQVAE(mini_vq_config())
    previous = json.loads((Path(cfg.init) / "vq.json").read_text()) if cfg.init else None
    pixels = eval_pixels()
    command = "python jobs/train_mini_vq.py " + " ".join(f"{k}={v}" for k, v in settings.items())

    def checkpoint(history: list[dict]) -> None:
        save_vq(vq, out, {"command": command.strip(), "settings": dataclasses.asdict(cfg), "history": history,
                          "finished": False, "continues": previous})

    try:
        train_vq(vq, cfg, pixels, on_log=checkpoint)
    except KeyboardInterrupt:  # Ctrl-C keeps the last logged checkpoint, measured and recorded
        print("interrupted: finishing the last checkpoint", flush=True)
    return finalize_vq(out)


def finalize_vq(folder: str | Path) -> dict:
    """Measures a written tokenizer as it is stored (float16) on the fixed evaluation scenes and
    records the PSNR and a reconstruction sheet beside it; the record is what the test reproduces."""
    from janus_lab.miniature.vq_train import evaluate_psnr

    folder = Path(folder)
    record = json.loads((folder / "vq.json").read_text())
    vq = load_mini_vq(folder)
    pixels = eval_pixels()
    steps = record["history"][-1]["step"] if record["history"] else 0
    record.update(finished=True, steps_trained=steps, eval_scenes={"seed": EVAL_SCENES_SEED, "count": EVAL_SCENES},
                  eval_psnr_db=round(evaluate_psnr(vq, pixels), 3))
    (folder / "vq.json").write_text(json.dumps(record, indent=2) + "\n")
    reconstruction_sheet(vq, pixels[:32]).save(folder / "vq_reconstructions.png")
    return record
