"""Streaming shards into micro-batches: each rank's part of an epoch, its order, mix, reads and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyarrow import fs as pafs

from janus_lab.data.schema import DatasetManifest
from janus_lab.data.stream import (
    ReadCounter,
    StreamSpec,
    epoch_micro_batches,
    epoch_order_signature,
    epoch_part,
    micro_batches,
    read_part,
    read_split,
    scan_layout,
    steps_per_epoch,
)
from janus_lab.model import SequenceBuilder, debug
from synthetic_shards import write_synthetic_dataset

# Two sources written one after the other (384 T2I rows, then 256 TI2I rows), shards of 128
# rows in row groups of 16: every row group holds one task and one source.
NUM_T2I, NUM_TI2I = 384, 256


@pytest.fixture(scope="module")
def builder():
    bundle = debug()
    return SequenceBuilder(bundle.processor.tokenizer, bundle.num_image_tokens)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """64 train rows in shards of 16, one row group each (the layout of ingests before row groups)."""
    root = write_synthetic_dataset(tmp_path_factory.mktemp("shards"), num_t2i=40, num_ti2i=24, num_val=0)
    return scan_layout(str(root))


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("two-sources"), num_t2i=NUM_T2I, num_ti2i=NUM_TI2I,
                                   num_val=32, rows_per_shard=128, rows_per_row_group=16)
    return scan_layout(str(root))


def spec(**kwargs) -> StreamSpec:
    base = dict(epoch=0, rank=0, world_size=2, micro_batch_size=2, t2i_text_drop=0.1, ti2i_image_drop=0.5,
                group_window=4, shuffle_window_rows=8)
    return StreamSpec(**(base | kwargs))


def signature(batch) -> tuple:
    return tuple(batch["input_ids"].flatten().tolist()), tuple(batch["gen_codes"].flatten().tolist())


def rank_ids(layout, rank: int, world_size: int, epoch: int = 0, window: int = 128) -> list[str]:
    part = epoch_part(layout, 0, epoch, rank, world_size)
    return [row["id"] for row in read_part(layout, part, 0, epoch, window, columns=["id"])]


def counted_read(layout, rank: int, world_size: int, **kwargs) -> int:
    counter = ReadCounter(pafs.LocalFileSystem())
    part = epoch_part(layout, 0, 0, rank, world_size)
    for _ in read_part(layout, part, 0, 0, 128, filesystem=counter, **kwargs):
        pass
    return counter.bytes_read


def test_the_layout_counts_each_row_group_per_split(tmp_path):
    # Old layout: one row group per shard, the last one mixing train and validation rows.
    mixed = scan_layout(str(write_synthetic_dataset(tmp_path / "mixed", num_t2i=24, num_ti2i=16, num_val=8)))
    manifest = DatasetManifest.read(mixed.uri)
    assert [(g.train, g.val) for g in mixed.row_groups] == [(16, 0), (16, 0), (8, 8)]
    assert mixed.rows("train") == manifest.split_rows("train") and mixed.rows("val") == 8
    assert {row["id"] for row in read_split(mixed, "val")} == {f"sample-{i:04d}" for i in range(40, 48)}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_parts_are_disjoint_equal_and_cover_the_epoch(two_sources, world_size):
    parts = [rank_ids(two_sources, rank, world_size) for rank in range(world_size)]
    train = two_sources.rows("train")
    assert all(len(ids) == train // world_size for ids in parts)
    seen = [i for ids in parts for i in ids]
    assert len(set(seen)) == len(seen) == train  # disjoint, and (train divides evenly) the whole epoch
    assert not any(i >= f"sample-{NUM_T2I + NUM_TI2I:04d}" for i in seen), "validation rows are not trained on"
    assert rank_ids(two_sources, 0, world_size, epoch=1) != parts[0], "every epoch has its own order"


def test_a_worker_reads_only_its_part(two_sources):
    whole = counted_read(two_sources, 0, 1)
    for world_size in (2, 4):
        per_rank = [counted_read(two_sources, rank, world_size) for rank in range(world_size)]
        # Together they read what one worker alone reads: the epoch once, not once per worker.
        assert sum(per_rank) == pytest.approx(whole, rel=0.05)
        assert max(per_rank) < 0.75 * whole if world_size == 2 else max(per_rank) < 0.4 * whole
    # Validation rows sit in row groups of their own; reading them fetches nothing else.
    val = ReadCounter(pafs.LocalFileSystem())
    assert len(read_split(two_sources, "val", filesystem=val)) == 32
    assert val.bytes_read < 0.1 * whole


def test_steps_mix_two_sources_written_one_after_the_other(two_sources, builder):
    """Each optimizer step's share of T2I (= of the first source) is as close to the dataset's
    as a uniform draw's, though every row group holds a single task and source."""
    world_size, micro, accumulation = 2, 4, 2
    per_step = world_size * micro * accumulation
    steps = steps_per_epoch(two_sources.rows("train"), world_size, micro, accumulation)
    t2i = np.zeros(steps)
    for rank in range(world_size):
        rank_spec = StreamSpec(epoch=0, rank=rank, world_size=world_size, micro_batch_size=micro,
                               group_window=accumulation, shuffle_window_rows=128)
        batches = list(epoch_micro_batches(two_sources, builder, rank_spec, limit=steps * accumulation))
        for index, batch in enumerate(batches):
            t2i[index // accumulation] += int(batch["task_is_t2i"].sum())
    share = t2i / per_step
    dataset = NUM_T2I / (NUM_T2I + NUM_TI2I)
    uniform = np.abs(np.random.default_rng(0).hypergeometric(NUM_T2I, NUM_TI2I, per_step, 20_000) / per_step
                     - dataset).mean()
    assert np.abs(share - dataset).mean() < 1.25 * uniform, (share, uniform)
    assert 0 < share.min() and share.max() < 1, "a step of a single task"
    # In source order (the shards as written, no mixing) steps are one task for most of the epoch.
    source_order = np.repeat([1.0, 0.0], [NUM_T2I // per_step, NUM_TI2I // per_step])
    assert np.abs(source_order - dataset).mean() > 3 * uniform


def test_same_inputs_give_the_same_batches(layout, builder):
    first = [signature(b) for b in epoch_micro_batches(layout, builder, spec())]
    again = [signature(b) for b in epoch_micro_batches(layout, builder, spec())]
    assert first == again and len(first) == 64 // 2 // 2
    other_epoch = [signature(b) for b in epoch_micro_batches(layout, builder, spec(epoch=1))]
    assert first != other_epoch, "order and masking are drawn per epoch"


@pytest.mark.parametrize("skip", [1, 4, 5, 8, 11])
def test_skip_resumes_exactly_where_a_run_stopped(layout, builder, skip):
    full = [signature(b) for b in epoch_micro_batches(layout, builder, spec())]
    resumed = [signature(b) for b in epoch_micro_batches(layout, builder, spec(), skip=skip)]
    assert resumed == full[skip:]


def test_a_resume_does_not_fetch_what_came_before_it(two_sources, builder):
    def fetched(skip: int) -> int:
        counter = ReadCounter(pafs.LocalFileSystem())
        for _ in epoch_micro_batches(two_sources, builder, spec(shuffle_window_rows=32), skip=skip,
                                     filesystem=counter):
            pass
        return counter.bytes_read

    half = two_sources.rows("train") // 2 // 2 // 2  # micro-batches in half of rank 0's part
    assert fetched(half) < 0.6 * fetched(0)


def test_limit_caps_the_number_of_batches(layout, builder):
    assert len(list(epoch_micro_batches(layout, builder, spec(), limit=3))) == 3
    assert len(list(epoch_micro_batches(layout, builder, spec(), skip=2, limit=5))) == 3
    assert len(list(epoch_micro_batches(layout, builder, spec(), skip=8, limit=8))) == 0


def test_length_grouping_reduces_padding(layout, builder):
    rows = list(read_split(layout, "train"))

    def padding(window: int) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in micro_batches(rows, builder, spec(group_window=window)))

    assert padding(8) < padding(1)


def test_batches_carry_input_images_for_editing_samples(layout, builder):
    edit_batches = 0
    for batch in epoch_micro_batches(layout, builder, spec(ti2i_image_drop=0.0)):
        image_slots = int((batch["input_ids"] == builder.special.image).sum())
        editing_rows = int((~batch["task_is_t2i"]).sum())
        # With no image dropped, a batch has image slots exactly when it has editing rows.
        assert (image_slots > 0) == (editing_rows > 0)
        if editing_rows:
            edit_batches += 1
            assert batch["pixel_values"].shape[0] * builder.num_image_tokens == image_slots
            assert batch["pixel_values"].shape[1:] == (3, 64, 64)
            assert torch.all(batch["pixel_values"].abs() <= 1.0)
        assert batch["task_is_t2i"].dtype == torch.bool
    assert edit_batches > 0, "the dataset's epoch held no editing sample: the checks above never ran"


def test_the_order_signature_names_seed_window_and_layout(layout, two_sources):
    base = epoch_order_signature(layout, 0, 1024)
    assert base == epoch_order_signature(layout, 0, 1024)
    assert len({base, epoch_order_signature(layout, 1, 1024), epoch_order_signature(layout, 0, 512),
                epoch_order_signature(two_sources, 0, 1024)}) == 4


def test_epoch_arithmetic():
    manifest = DatasetManifest(source={}, model={}, counts={"t2i": {"train": 40, "val": 4}, "ti2i": {"train": 24}},
                               rows=68, shards=[], rejects=0, val_fraction=None, seed=0)
    assert manifest.split_rows("train") == 64 and manifest.split_rows("val") == 4
    assert steps_per_epoch(64, world_size=2, micro_batch_size=2, accumulation=4) == 4
    assert steps_per_epoch(15, world_size=2, micro_batch_size=2, accumulation=4) == 0


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no _manifest.json: .*ingest it with jobs/ingest.py"):
        DatasetManifest.read(str(tmp_path))
