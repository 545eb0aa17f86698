"""Register a fine-tuning run's export in the MLflow model registry; champion moves only when it wins.

    python jobs/promote.py run_id=<MLFLOW_RUN_ID>
    python jobs/promote.py run_id=<MLFLOW_RUN_ID> name=janus-4o metric=val_accuracy direction=maximize
    python jobs/promote.py run_id=<MLFLOW_RUN_ID> force=true reason="rollback, v4 breaks edits"

The run's export (its `export_uri` tag, s3:// or local) is copied into the run's artifacts under
`model/` and registered as a new version of `name`, tagged with the run id, dataset manifest,
git commit and the run's val_* metrics. The version becomes `@challenger`; it becomes
`@champion` when there is none yet, when it is strictly better than the champion on `metric`
(`direction`), or when forced (the reason is stored as the version tag `force_reason`).
Nothing changes when a check fails. Then load it anywhere with `models:/janus-4o@champion`.
The registry is the MLflow server in MLFLOW_TRACKING_URI (or `tracking_uri=`). Values are read
as YAML, so a reason containing `: ` needs inner quotes: reason="'rollback: v4 breaks edits'".
"""

from __future__ import annotations

import sys

from janus_lab.config import parse_cli
from janus_lab.registry import PromoteConfig, PromotionError, promote


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(PromoteConfig, argv, description=__doc__)
    try:
        result = promote(cfg)
    except PromotionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
