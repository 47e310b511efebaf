"""Checkpoints written in the background: the state copied at save time is what lands on disk."""

from __future__ import annotations

import threading
import time
from functools import partial

import pytest
import torch

from cifar100.runfolder.checkpoint import (
    BackgroundWriter,
    CheckpointWriter,
    Snapshot,
    host_copy,
    load_train_state,
    load_weights,
    read_meta,
    save_checkpoint,
)


def test_host_copy_is_independent_of_later_in_place_updates():
    weights = {"w": torch.ones(3)}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "ranks": [{"sums": torch.zeros(4), "step": 3}], "scaler": None}
    copied_weights, copied = host_copy(weights), host_copy(state)
    weights["w"].add_(1)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()  # updates the momentum buffer in place
    state["ranks"][0]["sums"].add_(5)
    assert torch.equal(copied_weights["w"], torch.ones(3))
    assert torch.equal(copied["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))
    assert torch.equal(copied["ranks"][0]["sums"], torch.zeros(4)) and copied["ranks"][0]["step"] == 3
    assert copied["scaler"] is None and copied["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_writer_runs_jobs_one_at_a_time_in_order():
    events, running = [], threading.Lock()

    def job(name):
        def run():
            assert running.acquire(blocking=False), "two writes at once"
            events.append(f"start {name}")
            time.sleep(0.05)
            events.append(f"end {name}")
            running.release()

        return run

    writer = BackgroundWriter()
    for name in "abc":
        writer.submit(job(name))
    writer.wait()
    assert events == ["start a", "end a", "start b", "end b", "start c", "end c"]


def test_a_background_checkpoint_holds_the_state_of_its_save_while_training_goes_on(tmp_path):
    params = {"w": torch.arange(1_000_000, dtype=torch.float32)}
    train_state = {"sums": torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)}
    writer = BackgroundWriter()
    writer.submit(partial(save_checkpoint, tmp_path, "step-1", host_copy(params), host_copy(train_state), {}))
    for _ in range(20):  # training goes on, in place, while the write runs
        params["w"].mul_(0.5)
        train_state["sums"].add_(1)
    writer.wait()
    assert torch.equal(load_weights(tmp_path / "step-1")["w"], torch.arange(1_000_000, dtype=torch.float32))
    assert load_train_state(tmp_path / "step-1")["sums"].tolist() == [1.0, 2.0, 3.0, 0.0]


def test_an_error_in_a_write_is_raised_in_the_caller():
    writer = BackgroundWriter()

    def broken():
        raise ValueError("serialiser bug")

    writer.submit(broken)
    with pytest.raises(ValueError, match="serialiser bug"):
        writer.wait()
    writer.wait()  # raised once, then cleared


def _snapshot(value: float) -> Snapshot:
    step = int(value)
    meta = {"epoch": step, "step_in_epoch": 0, "global_step": step, "totals": {"epochs_done": step}}
    return Snapshot({"w": torch.full((4,), value)}, {"optimizer": {}}, meta)


def test_the_writer_knows_what_is_on_disk_when_the_best_weights_cannot_be_written(tmp_path):
    ckpt = tmp_path / "checkpoints"
    writer = CheckpointWriter(ckpt, keep_last=2)
    writer.submit("step-00000001", _snapshot(1), score=0.10)
    writer.wait()
    assert (ckpt / "best").resolve().name == "best-step-00000001" and writer.best_score == 0.10
    # A real failure for the best weights only: a file where their temporary folder goes.
    (ckpt / ".tmp-best-step-00000002").write_text("in the way")
    with pytest.warns(UserWarning) as caught:
        writer.submit("step-00000002", _snapshot(2), score=0.30)
        writer.wait()
    message = str(caught[0].message)
    assert message.startswith("best weights of step-00000002 not saved (")
    assert "checkpoints/best still holds best-step-00000001" in message and "intact" not in message
    assert writer.best_score == 0.10 and writer.last_good == ckpt / "step-00000002"
    assert read_meta(ckpt / "step-00000002")["best_score"] == 0.10  # a resume compares against what is on disk
    (ckpt / ".tmp-best-step-00000002").unlink()
    # A later epoch below the lost best but above the one on disk becomes the best.
    writer.submit("step-00000003", _snapshot(3), score=0.20)
    writer.wait()
    assert (ckpt / "best").resolve().name == "best-step-00000003" and writer.best_score == 0.20
    assert torch.equal(load_weights(ckpt / "best")["w"], torch.full((4,), 3.0))
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002", "step-00000003"]


def test_a_step_checkpoint_that_cannot_be_written_names_the_intact_previous_one(tmp_path):
    ckpt = tmp_path / "checkpoints"
    writer = CheckpointWriter(ckpt, keep_last=2)
    writer.submit("step-00000001", _snapshot(1))
    writer.wait()
    (ckpt / ".tmp-step-00000002").write_text("in the way")
    with pytest.warns(
        UserWarning,
        match=r"checkpoint step-00000002 not saved \(.*\); the previous checkpoint "
        r"\(step-00000001\) is intact and loadable",
    ):
        writer.submit("step-00000002", _snapshot(2))
        writer.wait()
    assert writer.last_good == ckpt / "step-00000001" and (ckpt / "last").resolve().name == "step-00000001"
