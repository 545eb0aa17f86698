"""The training state checkpoint (`janus_lab.train.state`) in one process: what a resume restores,
and the refusal to resume a data position counted in another batch geometry."""

from __future__ import annotations

import pytest
import torch

from janus_lab.train.config import TrainConfig
from janus_lab.train.loop import build_optimizer
from janus_lab.train.schedule import build_scheduler
from janus_lab.train.state import ResumeMismatchError, TrainState, data_geometry


def make_state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    return TrainState(model, optimizer, build_scheduler(optimizer, 10, 0.1, 0.15), rank=0)


def test_resume_restores_progress_weights_and_rng(tmp_path):
    geometry = data_geometry(2, 2, 8, seed=0)
    state = make_state(0)
    state.model(torch.ones(2, 4)).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    state.progress.step, state.progress.epoch, state.progress.micro_batches_in_epoch = 3, 1, 5
    state.progress.geometry = geometry
    state.save(str(tmp_path / "ckpt"))
    after_save = torch.rand(3)

    resumed = make_state(1)
    resumed.load(str(tmp_path / "ckpt"), geometry)
    assert (resumed.progress.step, resumed.progress.epoch, resumed.progress.micro_batches_in_epoch) == (3, 1, 5)
    assert torch.equal(resumed.model.weight, state.model.weight)
    assert resumed.scheduler.get_last_lr() == state.scheduler.get_last_lr()
    assert torch.equal(torch.rand(3), after_save)  # the RNG stream continues where the checkpoint left it


@pytest.mark.parametrize("workers, micro, batch, seed", [(4, 2, 8, 0), (2, 1, 8, 0), (2, 2, 16, 0), (2, 2, 8, 1)])
def test_resume_in_another_geometry_is_refused_naming_both(tmp_path, workers, micro, batch, seed):
    state = make_state(0)
    state.progress.step, state.progress.geometry = 4, data_geometry(2, 2, 8, seed=0)
    state.save(str(tmp_path / "ckpt"))
    other = data_geometry(workers, micro, batch, seed)
    with pytest.raises(ResumeMismatchError) as caught:
        make_state(0).load(str(tmp_path / "ckpt"), other)
    message = str(caught.value)
    assert "2 workers x micro-batch 2, global batch 8, seed 0" in message and other in message
    assert "train.num_workers" in message and "step 4" in message


def test_resume_with_another_epoch_order_is_refused(tmp_path):
    from janus_lab.data.stream import DatasetLayout, RowGroup, epoch_order_signature

    layout = DatasetLayout(uri="s3://bucket/data", row_groups=[RowGroup("part-00000.parquet", 0, 96, 4)], footers={})
    reingested = DatasetLayout(uri=layout.uri, row_groups=[RowGroup("part-00000.parquet", 0, 100, 0)], footers={})
    state = make_state(0)
    state.progress.step, state.progress.geometry = 4, data_geometry(2, 2, 8, 0, epoch_order_signature(layout, 0, 1024))
    state.save(str(tmp_path / "ckpt"))
    make_state(0).load(str(tmp_path / "ckpt"), data_geometry(2, 2, 8, 0, epoch_order_signature(layout, 0, 1024)))
    for seed, window, data in ((1, 1024, layout), (0, 512, layout), (0, 1024, reingested)):
        with pytest.raises(ResumeMismatchError, match="data.shuffle_seed"):
            make_state(0).load(str(tmp_path / "ckpt"), data_geometry(2, 2, 8, 0, epoch_order_signature(data, seed, window)))
