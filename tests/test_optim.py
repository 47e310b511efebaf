"""Optimizers and the per-step schedule: warmup, cosine, step, plateau."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import timm
import torch
from torch import nn

from cifar100.commands.report_page import optimizer_text, scheduler_text
from cifar100.config import Config, LookaheadConfig, MuonConfig, OptimConfig, SchedConfig
from cifar100.errors import UserError
from cifar100.training import models  # noqa: F401  # registers cifarnet_*
from cifar100.training.muon import MuonSGD
from cifar100.training.optim import OPTIMIZERS, SCHEDULES, Schedule, build_optimizer, hidden_weights


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))


@pytest.mark.parametrize(
    "name, cls",
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("nadam", torch.optim.NAdam), ("adamw", torch.optim.AdamW)],
)
def test_optimizer_kinds(name, cls):
    opt = build_optimizer(_model(), OptimConfig(name=name, lr=0.01))
    assert isinstance(opt, cls)


def test_no_weight_decay_on_norm_and_bias():
    model = _model()
    opt = build_optimizer(model, OptimConfig(weight_decay=5e-4, no_decay_norm_bias=True, nesterov=True))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["nesterov"] is True


def _schedule(sched: SchedConfig, steps_per_epoch=10, epochs=20, lr=0.2):
    opt = torch.optim.SGD(_model().parameters(), lr=123.0)
    return opt, Schedule(opt, OptimConfig(lr=lr), sched, steps_per_epoch, epochs)


def test_warmup_then_cosine_values():
    opt, s = _schedule(SchedConfig(name="cosine", warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-3))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # step 0: the warmup start
    assert s.lr_at(25) == pytest.approx(1e-4 + (0.2 - 1e-4) * 0.5)  # halfway up, linearly
    assert s.lr_at(50) == pytest.approx(0.2)  # end of warmup: the peak
    assert s.lr_at(125) == pytest.approx(1e-3 + (0.2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(200) == pytest.approx(1e-3)  # the end: min_lr
    for _ in range(50):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_step_and_none_schedules():
    _, s = _schedule(SchedConfig(name="step", step_epochs=5, gamma=0.1))
    assert [s.lr_at(i) for i in (0, 49, 50, 100)] == pytest.approx([0.2, 0.2, 0.02, 0.002])
    _, s = _schedule(SchedConfig(name="none"))
    assert s.lr_at(0) == s.lr_at(199) == 0.2


def test_plateau_decays_after_patience_and_state_round_trips():
    opt, s = _schedule(SchedConfig(name="plateau", patience=2, gamma=0.5))
    for loss in (1.0, 0.9, 0.95, 0.95):
        s.epoch_end(loss)
    assert s.lr == 0.2  # two bad epochs: still patient
    s.epoch_end(0.99)
    assert s.lr == pytest.approx(0.1) and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(7):
        s.step()
    state = s.state_dict()
    opt2, s2 = _schedule(SchedConfig(name="plateau", patience=2, gamma=0.5))
    s2.load_state_dict(state)
    assert s2.state_dict() == state and opt2.param_groups[0]["lr"] == pytest.approx(0.1)


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(UserError, match=r"longer than train.epochs"):
        _schedule(SchedConfig(warmup_epochs=30), epochs=20)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_trains_and_the_report_names_it(name):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.1))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < first
    text = optimizer_text(Config(optim=OptimConfig(name=name, lr=0.1)))
    assert text.startswith(OPTIMIZERS[name].title + " (lr 0.1")
    assert ("momentum 0.9" in text) == OPTIMIZERS[name].momentum


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_registered_schedule_starts_at_the_peak_after_warmup_and_the_report_names_it(name):
    _, s = _schedule(SchedConfig(name=name, warmup_epochs=0))
    assert s.lr == pytest.approx(0.2)
    assert scheduler_text(Config(optim=OptimConfig(lr=0.2), sched=SchedConfig(name=name))) == SCHEDULES[name].describe(
        SchedConfig(name=name)
    )


def _wsd(steps: int, cooldown: float, warmup_epochs: float = 1.0) -> Schedule:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = SchedConfig(name="wsd", warmup_epochs=warmup_epochs, warmup_lr=0.0, min_lr=0.001, cooldown=cooldown)
    return Schedule(opt, OptimConfig(lr=0.1), sched, steps_per_epoch=10, epochs=100, steps=steps)


def test_wsd_warms_up_holds_then_cools_down_over_its_last_share():
    s = _wsd(100, 0.2)
    rates = [s.lr_at(i) for i in range(100)]
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.05)  # warmup: one epoch of 10 steps
    assert set(rates[10:80]) == {0.1}  # constant until the last 20 steps
    assert rates[79] == 0.1 and 0.001 < rates[80] < 0.1  # the cooldown starts at step 80...
    assert all(a > b for a, b in itertools.pairwise(rates[80:]))
    assert rates[99] == pytest.approx(0.001)  # ...and ends at min_lr on the last step


def test_wsd_rate_before_its_cooldown_does_not_depend_on_the_length():
    # What lets one checkpoint serve a longer run and a cooldown branch: the same warmup and peak.
    short, long, flat = _wsd(40, 0.25), _wsd(400, 0.2), _wsd(400, 0.0)
    first = [[s.lr_at(i) for i in range(30)] for s in (short, long, flat)]
    assert first[0] == first[1] == first[2]
    assert {flat.lr_at(i) for i in range(10, 400)} == {0.1}


MUON = OptimConfig(name="muon", lr=0.2, nesterov=True, muon=MuonConfig(lr=0.05, momentum=0.6, weight_decay=0.01))


def test_muon_takes_the_hidden_convs_and_sgd_the_stem_head_norms_and_biases_each_at_its_share_of_the_rate():
    model = timm.create_model("cifarnet_s", num_classes=100)
    opt = build_optimizer(model, MUON)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, rest = ([names[id(p)] for g in opt.param_groups if g["muon"] == flag for p in g["params"]] for flag in (1, 0))
    assert sorted(muon) == sorted(f"blocks.{i}.conv{j}.weight" for i in range(3) for j in (1, 2))
    assert "stem.0.weight" in rest and "head.weight" in rest and "head.bias" in rest
    assert len(hidden_weights(model)) == 6
    schedule = Schedule(opt, MUON, SchedConfig(name="cosine"), steps_per_epoch=10, epochs=2)
    schedule.step()
    muon_group, sgd_group = opt.param_groups
    assert muon_group["lr"] / sgd_group["lr"] == pytest.approx(0.05 / 0.2)  # the schedule moves both together
    assert (muon_group["momentum"], muon_group["weight_decay"]) == (0.6, 0.01)
    assert (sgd_group["momentum"], sgd_group["nesterov"], sgd_group["weight_decay"]) == (0.9, True, 5e-4)


def test_muon_orthogonalises_in_float32_on_the_cpu_and_steps_like_torchs_sgd_elsewhere():
    torch.manual_seed(0)
    conv, bias = nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.randn(8))
    opt = MuonSGD([{"params": [conv], "muon": True, "lr": 0.1, "momentum": 0.0}, {"params": [bias], "lr": 0.1}])
    conv.grad, bias.grad = torch.randn(8, 4, 3, 3), torch.randn(8)
    before, grad = conv.detach().clone(), conv.grad.clone()
    expected_bias = bias.detach() - 0.1 * bias.grad
    opt.step()
    update = (before - conv.detach()).reshape(8, 36) / 0.1
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.5  # Newton-Schulz's near-orthogonal update
    assert torch.cosine_similarity(update.flatten(), grad.flatten(), dim=0) > 0.3
    assert torch.allclose(bias.detach(), expected_bias)


@pytest.mark.parametrize("optim", [MUON, OptimConfig(name="sgd", nesterov=True)], ids=["muon", "sgd"])
def test_lookahead_and_muon_state_round_trips_exactly(optim):
    """An optimizer rebuilt from a state_dict taken mid-run (between two slow-weight updates) goes on
    bit for bit: Muon's buffers, Lookahead's slow weights and step count all travel in it."""
    optim = dataclasses.replace(optim, lookahead=LookaheadConfig(steps=3, alpha=0.5))
    torch.manual_seed(0)
    model = timm.create_model("cifarnet_tiny", num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    opt = build_optimizer(model, optim)
    train(model, opt, 4)
    assert any("lookahead_slow_buff" in s for s in opt.state_dict()["state"].values())
    other = copy.deepcopy(model)
    again = build_optimizer(other, optim)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 5)
    train(other, again, 5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_muon_needs_a_rate_to_scale():
    with pytest.raises(UserError, match=r"optim\.lr must be above 0"):
        build_optimizer(_model(), dataclasses.replace(MUON, lr=0.0))
