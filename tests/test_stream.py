"""Streaming shards into micro-batches: the order, rank split and resume arithmetic."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from janus_lab.data.stream import (
    StreamSpec,
    micro_batches,
    order_key,
    own_rows,
    read_manifest,
    split_size,
    steps_per_epoch,
)
from janus_lab.model import SequenceBuilder, debug
from synthetic_shards import write_synthetic_dataset


@pytest.fixture(scope="module")
def builder():
    bundle = debug()
    return SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("shards"), num_t2i=40, num_ti2i=24, num_val=0)
    manifest = read_manifest(str(root))
    table = pq.read_table([str(root / name) for name in manifest["shards"]])
    return sorted(table.to_pylist(), key=lambda r: order_key(0, 0, r["id"]))


def spec(**kwargs) -> StreamSpec:
    base = dict(epoch=0, rank=0, world_size=2, micro_batch_size=2, t2i_text_drop=0.1, ti2i_image_drop=0.5,
                group_window=4)
    return StreamSpec(**(base | kwargs))


def signature(batch) -> tuple:
    return tuple(batch["input_ids"].flatten().tolist()), tuple(batch["gen_codes"].flatten().tolist())


def test_ranks_split_rows_evenly_and_disjointly(rows, builder):
    ids = [[row["id"] for row in own_rows(rows, rank, 2)] for rank in range(2)]
    assert len(ids[0]) == len(ids[1]) == len(rows) // 2
    assert set(ids[0]).isdisjoint(ids[1]) and set(ids[0]) | set(ids[1]) == {r["id"] for r in rows}
    for rank in range(2):
        assert len(list(micro_batches(rows, builder, spec(rank=rank)))) == len(rows) // 2 // 2


def test_same_inputs_give_the_same_batches(rows, builder):
    first = [signature(b) for b in micro_batches(rows, builder, spec())]
    again = [signature(b) for b in micro_batches(rows, builder, spec())]
    assert first == again
    other_epoch = [signature(b) for b in micro_batches(rows, builder, spec(epoch=1))]
    assert first != other_epoch, "masking is drawn per epoch"


@pytest.mark.parametrize("skip", [1, 5, 8, 11])
def test_skip_resumes_exactly_where_a_run_stopped(rows, builder, skip):
    full = [signature(b) for b in micro_batches(rows, builder, spec())]
    resumed = [signature(b) for b in micro_batches(rows, builder, spec(), skip=skip)]
    assert resumed == full[skip:]


def test_limit_caps_the_number_of_batches(rows, builder):
    assert len(list(micro_batches(rows, builder, spec(), limit=3))) == 3
    assert len(list(micro_batches(rows, builder, spec(), skip=2, limit=5))) == 3


def test_length_grouping_reduces_padding(rows, builder):
    def padding(window: int) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in micro_batches(rows, builder, spec(group_window=window)))

    assert padding(8) < padding(1)


def test_batches_carry_input_images_for_editing_samples(rows, builder):
    for batch in micro_batches(rows, builder, spec(ti2i_image_drop=0.0)):
        image_slots = int((batch["input_ids"] == builder.special.image).sum())
        if image_slots:
            assert batch["pixel_values"].shape[0] * builder.num_image_tokens == image_slots
            assert batch["pixel_values"].shape[1:] == (3, 64, 64)
            assert torch.all(batch["pixel_values"].abs() <= 1.0)
        assert batch["task_is_t2i"].dtype == torch.bool


def test_epoch_arithmetic():
    manifest = {"counts": {"t2i": {"train": 40, "val": 4}, "ti2i": {"train": 24}}}
    assert split_size(manifest, "train") == 64 and split_size(manifest, "val") == 4
    assert steps_per_epoch(64, world_size=2, micro_batch_size=2, accumulation=4) == 4
    assert steps_per_epoch(15, world_size=2, micro_batch_size=2, accumulation=4) == 0


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ingest it first"):
        read_manifest(str(tmp_path))
