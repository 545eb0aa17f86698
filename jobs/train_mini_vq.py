"""Trains the miniature VQ tokenizer on rendered scenes of the world and ships it.

    python jobs/train_mini_vq.py                       # the shipped tokenizer: seed 0, 2500 steps
    python jobs/train_mini_vq.py steps=200 out=/tmp/vq  # a quick look

Writes `<out>/vq.safetensors` (float16, the Janus VQ architecture at 64 px with the normalised
code search), `<out>/vq.json` (the settings, seed, PSNR history and the final PSNR on the fixed
evaluation scenes, which `tests/test_miniature.py` reproduces from the shipped file) and
`<out>/vq_reconstructions.png` (originals above their reconstructions). Not part of the demo
or the suite: about 40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
import sys

from janus_lab.miniature.assets import MINI_DIR, train_and_save_vq


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = dict(arg.split("=", 1) for arg in argv)
    out = overrides.pop("out", str(MINI_DIR))
    train_and_save_vq(out, **{k: type_of(k)(v) for k, v in overrides.items()})


def type_of(key: str):
    from janus_lab.miniature.vq_train import VQTrainConfig

    return type(getattr(VQTrainConfig(), key))


if __name__ == "__main__":
    main(sys.argv[1:])
