"""Ingest a raw dataset into VQ-coded Parquet shards, on Ray Data.

    ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/ingest_sample.yaml \
        source.path=s3://janus-lab/raw/sample output.uri=s3://janus-lab/shards/sample
    python jobs/ingest.py --config jobs/configs/ingest_sample.yaml      # data/sample -> data/sample-shards

Reads `source.path` (ShareGPT-4o-Image, Echo-4o-Image or plain JSONL; local or `s3://`) and
writes `output.uri`: `part-NNNNN.parquet` shards, `_rejects.parquet` (every record not ingested,
with the reason) and `_manifest.json`, last. An existing dataset is replaced only with
`output.overwrite=true`; an unfinished one (interrupted run) is cleaned up and redone.
A submitted job runs in a copy of the working dir without git-ignored folders (data/), so it
reads and writes `s3://` (or absolute paths on a one-machine cluster). `--help` lists every key.
"""

from __future__ import annotations

import logging
import sys

from janus_lab.config import parse_cli
from janus_lab.data import IngestError, OutputExistsError, SourceError, run_ingest
from janus_lab.data.config import IngestConfig


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(IngestConfig, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_ingest(cfg)
    except (SourceError, OutputExistsError, IngestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
