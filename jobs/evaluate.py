"""Evaluate a checkpoint: held-out NLL/accuracy, CLIP scores, and benchmark images to score offline.

    python jobs/evaluate.py model=models:/janus-4o@champion data_uri=s3://janus-lab/datasets/sample
    python jobs/evaluate.py model=outputs/debug/export prompts=sweeps/prompts/debug.jsonl clip_model=debug
    python jobs/evaluate.py model=... geneval=geneval/prompts/evaluation_metadata.jsonl \
        dpg=ELLA/dpg_bench/prompts imgedit=Benchmark/Basic/basic_edit.json imgedit_images=Benchmark/singleturn
    ray job submit --working-dir . -- python jobs/evaluate.py model=... data_uri=s3://...

Settings are `KEY=VALUE`; `--help` lists them. `settings=best_settings.yaml` generates with a
CFG sweep's winner. Output: `<output_dir>/scores.json` (also printed) and, per benchmark given,
`geneval/`, `dpg_bench/`, `imgedit/` in the layout the benchmark's official scoring reads (its
prompt files are inputs; they are not shipped). With `clip_model=debug` the CLIP scores come
from a random test CLIP and say so. A held-out row or prompt over `max_text_tokens` (or with an
unreadable input image) is refused alone, listed under `refused` in scores.json; the rest is scored.
"""

from __future__ import annotations

import json
import sys

from janus_lab.config import ConfigError, parse_cli
from janus_lab.evaluation.benchmarks import BenchmarkFileError
from janus_lab.evaluation.evaluate import EvaluateConfig, run_evaluate
from janus_lab.evaluation.heldout import EvaluationDataError
from janus_lab.generation.loading import ModelSourceError
from janus_lab.generation.requests import GenerationRequestError


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(EvaluateConfig, argv, description=__doc__)
    try:
        summary = run_evaluate(cfg)
    except (BenchmarkFileError, ConfigError, EvaluationDataError, FileNotFoundError, GenerationRequestError,
            ModelSourceError) as error:  # what the user can fix; anything else is a bug and shows its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if summary.clip_label:
        print(f"CLIP scores: {summary.clip_label}")
    print(json.dumps(summary.scores, indent=2))
    for name, folder in summary.exports.items():
        print(f"{name} images: {folder}")
    for part, items in summary.refused.items():
        print(f"{part}: refused {len(items)} (reasons under `refused` in {summary.scores_file})")
    print(f"scores written to {summary.scores_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
