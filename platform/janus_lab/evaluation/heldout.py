"""Held-out token NLL and accuracy per task: the validation split of an ingested dataset.

The same computation as training's validation (`janus_lab.train.loop.validate`), run in one
process on a loaded checkpoint, with the split read straight from the Parquet shards. A row
whose prompt is over the evaluation's token limit is left out alone and reported, never the
whole split.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from janus_lab.data.schema import DatasetManifest
from janus_lab.data.stream import STREAM_COLUMNS
from janus_lab.model import GenerationObjective
from janus_lab.model.builders import JanusBundle
from janus_lab.model.sequence import PromptTooLongError, SequenceBuilder
from janus_lab.storage import pyarrow_filesystem
from janus_lab.train.config import ExperimentConfig, TrainConfig


class EvaluationDataError(ValueError):
    """The dataset cannot be evaluated as asked (no val rows, or none that fits)."""


def read_split_rows(uri: str, split: str = "val") -> list[dict]:
    """One split's rows of an ingested dataset, in shard order (for sets small enough to hold).

    Raises:
        FileNotFoundError: no `_manifest.json` at `uri`.
    """
    manifest = DatasetManifest.read(uri)
    fs, root = pyarrow_filesystem(uri)
    rows = []
    for name in manifest.shards:
        table = pq.read_table(f"{root.rstrip('/')}/{name}", filesystem=fs, columns=STREAM_COLUMNS,
                              filters=[("split", "=", split)])
        rows += table.to_pylist()
    return rows


def heldout_metrics(bundle: JanusBundle, data_uri: str, batch_size: int = 4,
                    max_text_tokens: int = 256) -> tuple[dict, dict[str, str]]:
    """`val_nll`, `val_accuracy` and per task `val_t2i_*` / `val_ti2i_*` of a model on a dataset's val split.

    Returns:
        The metrics, and the rows left out (row id -> reason: a prompt over `max_text_tokens`).

    Raises:
        FileNotFoundError: the dataset has no manifest.
        ValueError: the split is empty, or every row was left out.
    """
    from janus_lab.train.loop import validate

    rows = read_split_rows(data_uri, "val")
    if not rows:
        raise EvaluationDataError(f"{data_uri} has no val rows to evaluate on "
                                  "(ingested with val_fraction 0 or val_count 0?)")
    builder = SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens, max_text_tokens)
    refused = {}
    for row in rows:
        try:
            builder.prompt_tokens(row["prompt"])
        except PromptTooLongError as err:
            refused[row["id"]] = str(err)
    rows = [row for row in rows if row["id"] not in refused]
    if not rows:
        raise EvaluationDataError(f"every val row of {data_uri} has a prompt over max_text_tokens={max_text_tokens}")
    device = next(bundle.model.parameters()).device
    objective = GenerationObjective(bundle.model).to(device)
    # validate() reads its micro-batch size from an experiment config.
    batching = ExperimentConfig(train=TrainConfig(micro_batch_size=batch_size, global_batch_size=batch_size,
                                                  num_workers=1))
    with torch.no_grad():
        return validate(objective, builder, rows, batching, device), refused
