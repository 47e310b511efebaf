"""The weight average's maths against hand computations, and its no-op on a skipped step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar100.config import EmaConfig
from cifar100.training.ema import WeightAverage


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


GOOD, SKIPPED = torch.tensor(False), torch.tensor(True)


def test_decay_warms_up_as_timm_documents_then_holds():
    model = small_model()
    flat = WeightAverage(model, EmaConfig(enabled=True, decay=0.99, warmup=False))
    assert [flat.decay_at(k) for k in (1, 2, 50)] == [0.0, 0.99, 0.99]  # the first update copies the weights
    warm = WeightAverage(model, EmaConfig(enabled=True, decay=0.99, warmup=True, warmup_power=0.75))
    # min(decay, 1 - k ** -power): 1 - 2 ** -0.75 = 0.40540, 1 - 10 ** -0.75 = 0.82217; 1 - 500 ** -0.75 > 0.99
    assert warm.decay_at(1) == 0.0
    assert warm.decay_at(2) == pytest.approx(0.405396, abs=1e-6)
    assert warm.decay_at(10) == pytest.approx(0.822172, abs=1e-6)
    assert warm.decay_at(500) == 0.99


def test_updates_match_a_hand_computation_every_n_steps():
    model = small_model()
    ema = WeightAverage(model, EmaConfig(enabled=True, decay=0.9, warmup=False, every=2))
    initial = [p.clone() for p in model.parameters()]
    set_weights(model, 1.0)
    ema.after_step(1, GOOD)  # not an update step (every 2): still the initial weights
    assert all(torch.equal(e, p) for e, p in zip(ema.module.parameters(), initial))
    ema.after_step(2, GOOD)  # update 1: copies
    assert all(torch.equal(p, torch.ones_like(p)) for p in ema.module.parameters())
    set_weights(model, 3.0)
    ema.after_step(3, GOOD)
    ema.after_step(4, GOOD)  # update 2: 0.9 * 1 + 0.1 * 3 = 1.2
    set_weights(model, 5.0)
    ema.after_step(6, GOOD)  # update 3: 0.9 * 1.2 + 0.1 * 5 = 1.58
    for p in ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.58), atol=1e-6)


def test_buffers_are_averaged_and_the_step_counter_copied():
    model = small_model()
    ema = WeightAverage(model, EmaConfig(enabled=True, decay=0.75, warmup=False))
    ema.after_step(1, GOOD)
    bn, ema_bn = model[1], ema.module[1]
    bn.running_mean.fill_(4.0)
    bn.num_batches_tracked.fill_(7)
    ema.after_step(2, GOOD)  # 0.75 * 0 + 0.25 * 4 = 1
    assert torch.equal(ema_bn.running_mean, torch.ones(4)) and int(ema_bn.num_batches_tracked) == 7


def test_a_skipped_step_leaves_every_finite_value_exactly_as_it_was():
    model = small_model()
    ema = WeightAverage(model, EmaConfig(enabled=True, decay=0.9, warmup=True))
    for step in (1, 2, 3):
        set_weights(model, float(step))
        ema.after_step(step, GOOD)
    before = {k: v.clone() for k, v in ema.module.state_dict().items() if v.is_floating_point()}
    set_weights(model, 100.0)
    model[1].running_var.fill_(50.0)
    ema.after_step(4, SKIPPED)
    after = ema.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    ema.after_step(5, GOOD)  # and the next good step moves it again
    assert not torch.equal(ema.module[0].weight, before["0.weight"])


def test_sync_on_one_process_changes_nothing(accelerate_state):
    from accelerate import Accelerator

    model = small_model()
    ema = WeightAverage(model, EmaConfig(enabled=True))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.sync(Accelerator(cpu=True))
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in before.items())
