"""The train state: state_dict and load_state_dict mirror each other, older checkpoints still load,
and a mid-epoch state of another world size is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from cifar100.config import ModelConfig, OptimConfig, SchedConfig
from cifar100.errors import UserError
from cifar100.training.engine import EpochProgress
from cifar100.training.models import build_model
from cifar100.training.optim import Schedule, build_optimizer
from cifar100.training.train_state import RunTotals, TrainState

# The tests make Accelerators (and so Accelerate's process-wide state) themselves.
pytestmark = pytest.mark.usefixtures("accelerate_state")


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="cifarnet_tiny"), 10)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1))
    schedule = Schedule(optimizer, OptimConfig(lr=0.1), SchedConfig(warmup_epochs=1), steps_per_epoch=4, epochs=3)
    return TrainState(model, optimizer, schedule, Accelerator(cpu=True))


def _train_steps(state: TrainState, n: int) -> None:
    for _ in range(n):
        loss = state.model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean()
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.schedule.step()


def test_a_loaded_state_continues_exactly_like_the_saved_one():
    saved = _state()
    _train_steps(saved, 3)
    saved.progress = EpochProgress(step=3, sums=torch.tensor([1.5, 2.0, 24.0, 0.0], dtype=torch.float64), seconds=4.0)
    saved.totals = RunTotals(epochs_done=0, train_images=0, images_per_rank=[0], wandb_id="abc")
    snap = copy.deepcopy(saved.state_dict())
    _train_steps(saved, 2)  # the run goes on from the saved position ...
    loaded = _state(seed=1)
    loaded.load_state_dict(snap, Path("step-3"))
    assert loaded.schedule.step_count == 3 and loaded.progress.step == 3 and loaded.totals.wandb_id == "abc"
    assert loaded.progress.sums.tolist() == [1.5, 2.0, 24.0, 0.0] and loaded.epoch == 1
    _train_steps(loaded, 2)  # ... and so does the resumed one: same RNG draws, same optimizer state
    for a, b in zip(saved.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)


def test_an_epoch_end_state_carries_no_progress_and_names_the_finished_epoch():
    state = _state()
    _train_steps(state, 4)
    state.end_epoch()
    snap = state.state_dict()
    assert snap.meta["epoch"] == 1 and snap.meta["step_in_epoch"] == 0 and snap.state["ranks"][0]["progress"] is None
    assert state.epoch == 2 and snap.meta["totals"]["epochs_done"] == 1


def test_a_checkpoint_written_before_the_train_state_existed_still_loads():
    snap = _state().state_dict()
    # meta.json of earlier versions kept the best score among the totals
    snap.meta["totals"] = {**snap.meta["totals"], "best_top1": 0.42}
    state = _state()
    state.load_state_dict(snap, Path("step-0"))
    assert state.totals.epochs_done == 0 and not hasattr(state.totals, "best_top1")


def test_a_mid_epoch_state_of_another_world_size_is_refused_and_an_epoch_end_one_is_not():
    state = _state()
    _train_steps(state, 2)
    state.progress = EpochProgress(step=2, sums=torch.zeros(4, dtype=torch.float64), seconds=1.0)
    snap = state.state_dict()
    snap.state["ranks"] = snap.state["ranks"] * 2  # as two processes saved it
    with pytest.raises(UserError, match="a mid-epoch checkpoint of 2 process\\(es\\) cannot continue on 1"):
        _state().load_state_dict(snap, Path("step-2"))
    state.end_epoch()
    snap = state.state_dict()
    snap.state["ranks"] = snap.state["ranks"] * 2
    snap.meta["totals"]["images_per_rank"] = [400, 400]
    with pytest.warns(UserWarning, match="resuming on 1 processes instead of 2"):
        other = _state()
        other.load_state_dict(snap, Path("step-4"))
    assert other.totals.images_per_rank == [800] and other.epoch == 2
