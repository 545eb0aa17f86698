"""Pre-trains the miniature base model (text-to-image only) and ships it.

    python jobs/pretrain_mini.py steps=2000 log_every=100   # the shipped base (seed 0; 9 min on 2 CPU cores)
    python jobs/pretrain_mini.py steps=300 out=/tmp/base  # a quick look

Starts from `mini-init` (the shipped VQ tokenizer, a seeded random language model) and trains
on the world's text-to-image records, held-out scenes excluded. Writes `<out>/base.safetensors`
(float16, everything but the VQ tokenizer) and `<out>/base.json` (command, settings, loss
history, and the held-out text-to-image score of the stored file, which a test reproduces).
Not part of the demo or the suite: `python jobs/evaluate_world.py models=[mini]` scores it on
every held-out record.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from janus_lab.miniature.assets import MINI_DIR, finalize_base, save_base
from janus_lab.miniature.pretrain import PretrainConfig, pretrain
from janus_lab.model.builders import mini_init


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = dict(arg.split("=", 1) for arg in argv)
    out = overrides.pop("out", str(MINI_DIR))
    defaults = PretrainConfig()
    cfg = PretrainConfig(**{k: type(getattr(defaults, k))(v) for k, v in overrides.items()})
    torch.manual_seed(cfg.seed)
    bundle = mini_init(seed=cfg.seed)
    history = pretrain(bundle.model, bundle.processor, cfg)
    command = "python jobs/pretrain_mini.py " + " ".join(argv)
    save_base(bundle.model, out, {"command": command.strip(), "settings": dataclasses.asdict(cfg),
                                  "history": history})
    heldout = finalize_base(out)["heldout"]
    print(f"wrote {out}/base.safetensors: held-out text-to-image score {heldout['t2i']:.3f} "
          f"(chance {heldout['chance_t2i']:.3f}, {heldout['prompts']} prompts x {heldout['samples']} images)")


if __name__ == "__main__":
    main(sys.argv[1:])
