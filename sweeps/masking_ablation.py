"""Masking-ratio ablation: one fine-tuning run per (t2i_text_drop, ti2i_image_drop) cell, on Ray Tune.

    python sweeps/masking_ablation.py --config sweeps/configs/debug.yaml
    python sweeps/masking_ablation.py --config sweeps/configs/debug.yaml --resume   # after an interruption
    ray job submit --working-dir . -- python sweeps/masking_ablation.py --config sweeps/configs/masking_janus4o_7b.yaml

Every cell runs to the end as its own Ray Train run (`<name>-<cell>`), logged as a child of
one MLflow parent run. At the end the parent holds `results/results.csv`, `results/results.md`
and `results/heatmap_<metric>.png`, and the table is printed. `--resume` continues the sweep's
Tune experiment (`run.storage_path/<name>`): finished trials are kept, an interrupted trial
continues from its latest checkpoint. Overrides are dotted keys, e.g.
`overrides.train.max_steps=100`, `grid.masking.t2i_text_drop=[0,0.1]`, `run.max_concurrent_trials=2`.
"""

from __future__ import annotations

import sys

from janus_lab.sweeps.config import MaskingAblationConfig
from janus_lab.sweeps.masking import run_masking_ablation
from janus_lab.sweeps.runner import sweep_cli


def main(argv: list[str] | None = None) -> int:
    _, status = sweep_cli(MaskingAblationConfig, run_masking_ablation, argv, __doc__)
    return status


if __name__ == "__main__":
    sys.exit(main())
