"""Trains the miniature VQ tokenizer on rendered scenes of the world and ships it.

    python jobs/train_mini_vq.py steps=3500 batch_size=8 lr=0.0003 quantize_after=600 restart_every=100  # the shipped one
    python jobs/train_mini_vq.py device=cuda steps=20000 batch_size=64      # on a GPU
    python jobs/train_mini_vq.py init=platform/janus_lab/miniature/weights steps=5000  # continue the shipped one
    python jobs/train_mini_vq.py steps=200 out=/tmp/vq                      # a quick look
    python jobs/train_mini_vq.py init=platform/janus_lab/miniature/weights decoder_only=true \
        steps=2000 batch_size=16 lr=0.0003 canonical_share=0.15  # sharpen the decoder, codes kept

Settings are `KEY=VALUE`, the fields of `janus_lab.miniature.vq_train.VQTrainConfig` (steps,
batch_size, lr, warmup_steps, quantize_after, restart_every, seed, device, init, ...); the
default `out` is the shipped folder. Ctrl-C stops at the last logged step and still measures it.

Writes `<out>/vq.safetensors` (float16, the Janus VQ architecture at 64 px with the normalised
code search), `<out>/vq.json` (the settings, seed, PSNR history and the final PSNR on the fixed
evaluation scenes, which `tests/test_miniature.py` reproduces from the shipped file) and
`<out>/vq_reconstructions.png` (originals above their reconstructions). Not part of the demo
or the suite: on 2 CPU cores a step at batch 8 takes about 0.6 s, and the shipped file took
3,500 of them (34 min, 20.05 dB; docs/miniature.md).
"""

from __future__ import annotations

import logging
import sys

from janus_lab.miniature.assets import MINI_DIR, train_and_save_vq


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = dict(arg.split("=", 1) for arg in argv)
    out = overrides.pop("out", str(MINI_DIR))
    train_and_save_vq(out, **{k: parse(k, v) for k, v in overrides.items()})


def parse(key: str, value: str):
    """`value` as the type of the `VQTrainConfig` field `key` (`true`/`false` for flags)."""
    from janus_lab.miniature.vq_train import VQTrainConfig

    kind = type(getattr(VQTrainConfig(), key))
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise SystemExit(f"{key} takes true or false, got {value!r}")
        return value.lower() == "true"
    return kind(value)


if __name__ == "__main__":
    main(sys.argv[1:])
