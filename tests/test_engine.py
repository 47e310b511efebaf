"""The training step's guards: a non-finite step skipped on every optimizer, too many stop, a signal stops.

These drive `Engine.train_epoch` in-process with a small linear model (no BatchNorm, so a NaN batch
leaves no running statistics behind) and compare final weights bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from cifar100.config import EmaConfig, OptimConfig, SchedConfig
from cifar100.data.mixing import BatchMixer
from cifar100.training.ema import WeightAverage
from cifar100.training.engine import Engine, EpochProgress, NonFiniteLoss, StepRules, phase_size, resize
from cifar100.training.optim import Schedule, build_optimizer

# The tests make Accelerators (and so Accelerate's process-wide state) themselves.
pytestmark = pytest.mark.usefixtures("accelerate_state")

BATCH = 8


def _batches(n: int, nan_at: tuple[int, ...] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        images = torch.randn(BATCH, 3, 4, 4, generator=gen)
        if i in nan_at:
            images[0, 0, 0, 0] = float("nan")
        out.append((images, torch.randint(0, 10, (BATCH,), generator=gen)))
    return out


def _train(
    optimizer_name: str,
    batches,
    *,
    accum: int = 1,
    max_bad_steps: int = 0,
    stop_from: int | None = None,
    ema: EmaConfig | None = None,
    record: list | None = None,
):
    """One epoch over `batches`; returns (result, progress, final weights). With `ema`, the weight
    average goes into `record` first, followed by the weights after each optimizer step."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    average = WeightAverage(model, ema) if ema else None
    if average is not None:
        record.append(average)
    optimizer = build_optimizer(model, OptimConfig(name=optimizer_name, lr=0.05, weight_decay=1e-4))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = Schedule(optimizer, OptimConfig(lr=0.05), SchedConfig(name="none", warmup_epochs=0), len(batches), 1)
    calls = []

    def stop_requested() -> bool:
        calls.append(None)
        return stop_from is not None and len(calls) > stop_from

    state = EpochProgress()
    engine = Engine(
        model,
        optimizer,
        schedule,
        BatchMixer(10, 0, 0, 0, 0, 0),
        accelerator,
        StepRules(seed=0, clip_grad=1.0, max_bad_steps=max_bad_steps),
        average,
    )
    result = engine.train_epoch(
        1,
        batches,
        state,
        stop_requested=stop_requested,
        after_step=lambda s: record is not None and record.append([p.detach().clone() for p in model.parameters()]),
    )
    return result, state, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "nadam"])
@pytest.mark.parametrize("bad", [0, 3])  # the first step: optimizer state is created then
def test_a_non_finite_step_changes_nothing_but_the_count(name, bad):
    """Fused optimizers skip on the device, NAdam on the host: either way the weights equal a run without that batch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, state, weights = _train(name, _batches(6, nan_at=(bad,)), max_bad_steps=1)
    _, _, clean = _train(name, [b for i, b in enumerate(_batches(6)) if i != bad])
    assert all(torch.equal(a, b) for a, b in zip(weights, clean))
    assert result.images == 5 * BATCH and state.sums[3].item() == 1
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert messages == [f"non-finite loss at epoch 1, step {bad}, lr 0.05: step skipped (1 of train.max_bad_steps=1)"]


@pytest.mark.parametrize("name", ["sgd", "nadam"])  # skipped on the device, and on the host
def test_a_skipped_step_does_not_move_the_weight_average(name):
    """The average after an epoch with a skipped step 3 equals a hand computation over the weights
    after each other step (the decay still counts every optimizer step, as the schedule does)."""
    cfg = EmaConfig(enabled=True, decay=0.6, warmup=False)
    record: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(name, _batches(6, nan_at=(3,)), max_bad_steps=1, ema=cfg, record=record)
    average, after_steps = record[0], record[1:]
    expected = [w.clone() for w in after_steps[0]]  # the first update copies
    for step, weights in enumerate(after_steps[1:], start=2):
        if step != 4:  # batch 3 is optimizer step 4
            expected = [0.6 * e + 0.4 * w for e, w in zip(expected, weights)]
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(average.module.parameters(), expected))
    assert not all(torch.allclose(a, w) for a, w in zip(average.module.parameters(), after_steps[-1]))


def test_a_non_finite_micro_step_skips_its_whole_accumulated_step():
    _, state, weights = _train("sgd", _batches(8, nan_at=(5,)), accum=2, max_bad_steps=1)
    _, _, clean = _train("sgd", [b for i, b in enumerate(_batches(8)) if i not in (4, 5)], accum=2)
    assert all(torch.equal(a, b) for a, b in zip(weights, clean))
    assert (
        state.sums[2].item() == 6 * BATCH and state.sums[3].item() == 1
    )  # neither micro-step of the skipped step counts


@pytest.mark.parametrize("name", ["sgd", "nadam"])
def test_more_non_finite_steps_than_allowed_stop_naming_the_step(name):
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at epoch 1, step 4, lr 0.05$"):
        _train(name, _batches(8, nan_at=(2, 4)), max_bad_steps=1)


@pytest.mark.parametrize("name", ["sgd", "nadam"])
def test_a_signal_stops_the_epoch_one_step_later_with_exact_progress(name):
    result, state, weights = _train(name, _batches(8), stop_from=2)  # signalled during step 2
    assert result is None and state.step == 4
    _, _, four = _train(name, _batches(4))
    assert all(torch.equal(a, b) for a, b in zip(weights, four))
    assert state.sums[2].item() == 4 * BATCH and state.sums[3].item() == 0


def test_norm_statistics_broken_by_a_skipped_step_start_afresh():
    """The NaN batch's forward pass made BatchNorm's running statistics NaN; they are reset, then learn again."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 10))
    optimizer = build_optimizer(model, OptimConfig(lr=0.05))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = Schedule(optimizer, OptimConfig(lr=0.05), SchedConfig(name="none", warmup_epochs=0), 6, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Engine(
            model, optimizer, schedule, BatchMixer(10, 0, 0, 0, 0, 0), accelerator, StepRules(seed=0, max_bad_steps=1)
        ).train_epoch(1, _batches(6, nan_at=(2,)), EpochProgress())
    norm = model[1]
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert int(norm.num_batches_tracked) == 2  # reset when step 2 is read, at the end of step 3; then steps 4, 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_epoch_with_every_step_skipped_stops_with_a_clear_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteLoss, match=r"^non-finite loss in every step of epoch 1$"):
            _train("sgd", _batches(3, nan_at=(0, 1, 2)), max_bad_steps=10)


def test_progress_saved_before_skips_were_summed_on_the_device_still_loads():
    """Mid-epoch checkpoints of the previous version kept three sums and a separate skip count."""
    old = {"step": 5, "sums": torch.tensor([10.0, 3.0, 40.0], dtype=torch.float64), "seconds": 2.5, "bad_steps": 1}
    progress = EpochProgress.from_state(old, torch.device("cpu"))
    assert progress.step == 5 and progress.seconds == 2.5
    assert progress.sums.tolist() == [10.0, 3.0, 40.0, 1.0]
    assert EpochProgress.from_state(progress.state_dict(), torch.device("cpu")).sums.tolist() == [10.0, 3.0, 40.0, 1.0]


def test_progressive_resizing_phases_follow_the_share_of_the_run_and_scale_the_batch():
    sizes = ((20.0, 0.3), (24.0, 0.3), (32.0, 0.4))
    assert [phase_size(sizes, p) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 0.99, 1.0)] == [20, 20, 24, 24, 32, 32, 32]
    assert phase_size((), 0.5) is None
    images = torch.randn(4, 3, 32, 32)
    assert (
        resize(images, 20).shape == (4, 3, 20, 20) and resize(images, 32) is images and resize(images, None) is images
    )
    flat = torch.full((1, 3, 32, 32), 0.7)
    assert torch.allclose(resize(flat, 20), torch.full((1, 3, 20, 20), 0.7))  # a shrink keeps the level
