"""Generate images (text-to-image and editing) from a checkpoint: PNGs, a contact sheet, codes.

    python jobs/generate.py model=models:/janus-4o@champion prompt="a red circle on a blue square"
    python jobs/generate.py model=outputs/debug/export requests=prompts.jsonl output_dir=outputs/generated
    python jobs/generate.py model=s3://bucket/run/export prompt="make it blue" input_images=[cat.png]
    ray job submit --working-dir . -- python jobs/generate.py model=... requests=prompts.jsonl

Settings are `KEY=VALUE` (`parallel_size=4 cfg_weight=5 temperature=1 top_k=... seed=0`);
`--help` lists them all. A JSONL line is one request with any of the same fields plus
`prompt` and `input_images` (paths relative to the file). Every request is checked before
the model runs. Output: `<output_dir>/images/*.png`, `contact_sheet.png`, `results.jsonl`.
A `models:/` URI is downloaded from the MLflow registry in MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import sys

from janus_lab.config import parse_cli
from janus_lab.generation.loading import ModelSourceError
from janus_lab.generation.offline import GenerateConfig, run_generate
from janus_lab.generation.requests import GenerationRequestError


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(GenerateConfig, argv, description=__doc__)
    try:
        summary = run_generate(cfg)
    except (GenerationRequestError, ModelSourceError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary.num_images} images for {summary.num_requests} requests to {summary.output_dir}")
    print(f"contact sheet {summary.contact_sheet}; codes and seeds in {summary.results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
