"""Score models on the miniature world's held-out records with the exact scorer.

    python jobs/evaluate_world.py models=[mini] output_dir=outputs/world-eval
    python jobs/evaluate_world.py models=[mini,models:/janus-4o@champion] labels=[base,fine-tuned]

For each model: every held-out text-to-image prompt and edit (`samples` images each, fixed
seeds), generated with the batched CFG engine and read back by `janus_lab.miniature.score`
(background, and each shape's colour, kind, size and place). Writes `scores.md` (a table with
chance and copy-the-input beside each score), `scores.json` and `grid.png` (inputs, target and
each model's image, a few records of every kind).
"""

from __future__ import annotations

import logging
import sys

from janus_lab.config import parse_cli
from janus_lab.generation.loading import ModelSourceError
from janus_lab.miniature.evaluate import EvaluateWorldConfig, run_evaluate_world


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = parse_cli(EvaluateWorldConfig, argv, description=__doc__)
    try:
        result = run_evaluate_world(cfg)
    except (ModelSourceError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"scores.md, scores.json and grid.png in {result['folder']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
