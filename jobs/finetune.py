"""Fine-tune Janus-Pro into a Janus-4o-style generator and editor with Ray Train + FSDP2.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/debug.yaml
    python jobs/finetune.py --config jobs/configs/debug.yaml train.max_steps=10   # same, without a job

Overrides are dotted keys (`train.lr=1e-5`); `--help` lists every key. Checkpoints go to
`train.storage_path/<name>/`, the final Hugging Face export to `.../<name>/export`, and the run
to MLflow (MLFLOW_TRACKING_URI, or `tracking.tracking_uri`).
"""

from __future__ import annotations

import sys

from janus_lab.config import parse_cli
from janus_lab.train.config import ExperimentConfig
from janus_lab.train.launch import PreflightError, run_finetune


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(ExperimentConfig, argv, description=__doc__)
    try:
        result = run_finetune(cfg)
    except PreflightError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"finished {result.run_name}: export {result.export_uri}")
    print(f"latest checkpoint {result.checkpoint_path}")
    print(f"MLflow run: {result.mlflow_url}")
    print(f"MLflow run id: {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
