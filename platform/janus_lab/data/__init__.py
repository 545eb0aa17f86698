"""Datasets: the sample data, reading raw sources, and the ingest to VQ-coded Parquet shards."""

from janus_lab.data.ingest import (
    IngestError,
    IngestResult,
    OutputExistsError,
    read_rejects,
    read_shards,
    run_ingest,
    vq_fingerprint,
)
from janus_lab.data.sample import sample_records, write_sample_dataset
from janus_lab.data.schema import (
    MANIFEST_NAME,
    REJECTS_NAME,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    DatasetManifest,
    Reject,
    split_of,
)
from janus_lab.data.sources import FORMATS, SourceError, read_records

__all__ = [
    "IngestError", "IngestResult", "OutputExistsError", "read_rejects", "read_shards", "run_ingest", "vq_fingerprint",
    "sample_records", "write_sample_dataset",
    "MANIFEST_NAME", "REJECTS_NAME", "REJECTS_SCHEMA", "SCHEMA_VERSION", "SHARD_SCHEMA", "DatasetManifest", "Reject",
    "split_of",
    "FORMATS", "SourceError", "read_records",
]
