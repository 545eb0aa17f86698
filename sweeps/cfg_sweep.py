"""CFG sweep: score one checkpoint's generations over cfg_weight x cfg_weight2 x temperature, on Ray Tune.

    python sweeps/cfg_sweep.py --config sweeps/configs/cfg_debug.yaml
    python sweeps/cfg_sweep.py --config sweeps/configs/cfg_debug.yaml model=models:/janus-4o@champion
    ray job submit --working-dir . -- python sweeps/cfg_sweep.py --config sweeps/configs/cfg_janus4o_7b.yaml

Each trial generates the held-out prompt set (`prompts`, JSONL: T2I and edit requests) with
one setting and scores it with CLIP-T (prompt vs image) and CLIP-I (edit input vs output) from
the CLIP at `clip_model`. One MLflow parent run holds `results/results.csv`, `results/results.md`,
a heatmap per score and `results/best_settings.yaml`; the best setting is also written to
`best_settings` (default outputs/sweeps/<name>/best_settings.yaml), a flat YAML of request
fields that the server takes as its defaults (serve/config.yaml `args.defaults_file`).
`--resume` continues an interrupted sweep. With `clip_model=debug` (or a folder written by
`janus_lab.evaluation.clip.save_random_clip`) the scores come from a random test CLIP, and
every output says so.
"""

from __future__ import annotations

import sys

from janus_lab.sweeps.cfg import run_cfg_sweep
from janus_lab.sweeps.config import CfgSweepConfig
from janus_lab.sweeps.runner import sweep_cli


def main(argv: list[str] | None = None) -> int:
    outcome, status = sweep_cli(CfgSweepConfig, run_cfg_sweep, argv, __doc__)
    if outcome is not None:
        print(f"scores: {outcome.clip_label}")
        if outcome.best_settings_path:
            print(f"best setting written to {outcome.best_settings_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
