"""Optimizers and the learning-rate schedule, stepped once per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import Lookahead
from torch import nn

from cifar100.config import OptimConfig, SchedConfig
from cifar100.errors import UserError
from cifar100.training.muon import MuonSGD


def _betas(cfg: OptimConfig) -> tuple[float, float]:
    beta1, beta2 = cfg.betas  # the config holds exactly two (its setting's length=2)
    return beta1, beta2


def _sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    sgd = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    if cfg.momentum:
        # Fused SGD creates its momentum buffers empty and fills them in the first step's kernel,
        # so a skipped first step would leave them unwritten. Zeros give the same first step.
        for group in groups:
            for param in group["params"]:
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return sgd


def _nadam(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    # torch has no fused NAdam; foreach is its fast path on CUDA.
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.NAdam(groups, lr=cfg.lr, betas=_betas(cfg), foreach=on_cuda or None)


def _muon(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.lr <= 0:
        raise UserError("optim.name=muon: the schedule scales Muon's rate with optim.lr, so optim.lr must be above 0")
    m = cfg.muon
    for group in groups:
        if group["hidden"]:
            group.update(muon=True, lr_scale=m.lr / cfg.lr, momentum=m.momentum, nesterov=True)
            group.update(weight_decay=m.weight_decay, ns_steps=m.ns_steps)
        else:
            group.update(muon=False, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return MuonSGD([{**g, "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in groups])


@dataclass(frozen=True)
class OptimizerKind:
    """One optimizer: its name in tables, its builder over parameter groups, and the keys it reads."""

    title: str
    build: Callable[[list[dict], OptimConfig], torch.optim.Optimizer]
    momentum: bool = False  # reads optim.momentum and optim.nesterov (else optim.betas)
    hidden: bool = False  # its groups say which hold hidden weights (group["hidden"]): Muon treats them apart


# The registry: config validation, the training loop and the report all read it, so a new
# optimizer is one entry here (and its test).
OPTIMIZERS: dict[str, OptimizerKind] = {
    "sgd": OptimizerKind("SGD", _sgd, momentum=True),
    "adam": OptimizerKind("Adam", lambda g, c: torch.optim.Adam(g, lr=c.lr, betas=_betas(c), fused=True)),
    "nadam": OptimizerKind("NAdam", _nadam),
    "adamw": OptimizerKind("AdamW", lambda g, c: torch.optim.AdamW(g, lr=c.lr, betas=_betas(c), fused=True)),
    "muon": OptimizerKind("Muon + SGD", _muon, momentum=True, hidden=True),
}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The `optim.name` optimizer over the model's parameters, fused where torch has a kernel.

    Fused kernels (SGD, Adam, AdamW, on CUDA and CPU) take one launch per step and can skip a
    step on the device (see engine); NAdam has none in torch and runs foreach on CUDA. Muon takes
    the hidden weights (`hidden_weights`), SGD the rest. `optim.lookahead.steps` wraps the optimizer
    in timm's Lookahead, whose slow weights live in the wrapped optimizer's state (and checkpoints).
    """
    kind = OPTIMIZERS[cfg.name]
    hidden = hidden_weights(model) if kind.hidden else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            # Norm scales and biases are 1-D; decaying them only fights the normalisation.
            decays = not (cfg.no_decay_norm_bias and param.ndim <= 1)
            groups.setdefault((id(param) in hidden, decays), []).append(param)
    order = sorted(groups, key=lambda k: (not k[0], not k[1]))  # hidden first, decayed first: a stable layout
    built = [
        {
            "params": groups[k],
            "weight_decay": cfg.weight_decay if k[1] else 0.0,
            **({"hidden": k[0]} if kind.hidden else {}),
        }
        for k in order
    ]
    optimizer = kind.build(built, cfg)
    if cfg.lookahead.steps:
        optimizer = Lookahead(optimizer, alpha=cfg.lookahead.alpha, k=cfg.lookahead.steps)
    return optimizer


def hidden_weights(model: nn.Module) -> set[int]:
    """The weights Muon orthogonalises: every parameter of two or more dimensions (conv filters,
    linear matrices) except those of the first conv and the classifier that timm's `pretrained_cfg`
    names, which map pixels in and features out rather than features to features; as their ids."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    edges = [cfg.get("first_conv") or "", cfg.get("classifier") or ""]
    edges = [name for name in edges if isinstance(name, str) and name]
    return {
        id(param)
        for name, param in model.named_parameters()
        if param.ndim >= 2 and not any(name == e or name.startswith(e + ".") for e in edges)
    }


@dataclass(frozen=True)
class ScheduleKind:
    """One decay after the warmup: the rate at a step, and how the report says it."""

    rate: Callable[[Schedule, float], float]  # (schedule, steps since the warmup) -> rate
    describe: Callable[[SchedConfig], str]
    watches_loss: bool = False  # takes the selected split's loss at each epoch's end
    # The warmup is warmup_epochs of steps whatever the run's length: WSD's, so that a run lengthened
    # on a resume, or a cooldown branched off it, shares its warmup (the others scale it with a plan).
    fixed_warmup: bool = False


def _cosine(s: Schedule, since: float) -> float:
    # A planned run's last step (shape_steps - 1) is at the final rate; an epoch run's ends one step short of it.
    progress = min(1.0, since / max(1, s.shape_steps - s.warmup_steps - s.planned))
    return s.cfg.min_lr + (s.peak - s.cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(s: Schedule, since: float) -> float:
    # Warmup, stable, decay: the peak until the last `sched.cooldown` share of the run, then (1 - sqrt)
    # down to min_lr on the last step (Hägele et al. 2024: (1 - sqrt) beats a linear cooldown).
    cooldown = round(s.cfg.cooldown * s.shape_steps)
    start = s.shape_steps - cooldown - s.warmup_steps  # steps since the warmup when the cooldown begins
    if cooldown == 0 or since < start:
        return s.peak
    progress = min(1.0, (since - start + 1) / cooldown)
    return s.cfg.min_lr + (s.peak - s.cfg.min_lr) * (1 - math.sqrt(progress))


def _num(value: float) -> str:
    return f"{value:g}"


SCHEDULES: dict[str, ScheduleKind] = {
    "cosine": ScheduleKind(_cosine, lambda c: "CosineAnnealingLR" + (f" to {_num(c.min_lr)}" if c.min_lr else "")),
    "step": ScheduleKind(
        lambda s, since: s.peak * s.cfg.gamma ** (since // s.step_interval),
        lambda c: f"StepLR (× {_num(c.gamma)} every {c.step_epochs} epochs)",
    ),
    "plateau": ScheduleKind(
        lambda s, since: max(s.cfg.min_lr, s.peak * s.plateau_scale),
        lambda c: f"ReduceLROnPlateau (× {_num(c.gamma)} after {c.patience} epochs without improvement)",
        watches_loss=True,
    ),
    "none": ScheduleKind(lambda s, since: s.peak, lambda c: "constant"),
    "wsd": ScheduleKind(
        _wsd,
        lambda c: (
            f"WSD (constant, then a (1 - sqrt) cooldown over the last {_num(c.cooldown * 100)} %"
            + (f" to {_num(c.min_lr)}" if c.min_lr else "")
            + ")"
        ),
        fixed_warmup=True,
    ),
}


class Schedule:
    """Linear warmup from `warmup_lr` to the peak, then the `sched.name` decay of SCHEDULES.

    `step()` after each optimizer step sets the rate for the next one; `epoch_end(loss)` feeds the
    plateau rule. By default the run is `epochs` of `steps_per_epoch` steps; `steps` (or a budget's
    plan, through `lay_over`) lays the same shape over another number of steps, and `bend` shortens
    or lengthens what is left of it. Its state (a few numbers) is saved with checkpoints.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        optim: OptimConfig,
        sched: SchedConfig,
        steps_per_epoch: int,
        epochs: int,
        steps: int = 0,
    ):
        self.optimizer = optimizer
        self.peak: float = optim.lr
        self.cfg: SchedConfig = sched
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        if sched.warmup_epochs > epochs:
            raise UserError(f"sched.warmup_epochs={sched.warmup_epochs} is longer than train.epochs={epochs}")
        self.step_count = 0
        self.plateau_scale: float = 1.0
        self.best_loss = math.inf
        self.bad_epochs = 0
        self.lay_over(steps or steps_per_epoch * epochs, planned=bool(steps))

    def lay_over(self, steps: int, planned: bool = True) -> None:
        """Lay the recipe's shape over `steps` optimizer steps: its warmup and step decays keep their
        share of the recipe's `epochs`; a `planned` run reaches the final rate on its last step."""
        self.shape_steps = self.total_steps = steps
        self.planned = planned
        self.bends: list[tuple[int, float, int]] = []  # (at step, its position in the shape, new total)
        if planned and not SCHEDULES[self.cfg.name].fixed_warmup:
            share = steps / (self.steps_per_epoch * self.epochs)
            self.warmup_steps = round(self.cfg.warmup_epochs * self.steps_per_epoch * share)
            self.step_interval: float = self.cfg.step_epochs * self.steps_per_epoch * share
        else:
            self.warmup_steps = round(self.cfg.warmup_epochs * self.steps_per_epoch)
            self.step_interval = self.cfg.step_epochs * self.steps_per_epoch
        self._apply()

    def bend(self, at_step: int, total: int) -> None:
        """From `at_step` on, run what is left of the shape in `total - at_step` steps instead: the rate
        goes on from where it is and still reaches the final rate on the new last step."""
        self.bends.append((at_step, self.position(at_step), total))
        self.total_steps = total
        self._apply()

    def position(self, step: int) -> float:
        """Where optimizer step `step` falls in the shape (itself, until a bend)."""
        for at, start, total in reversed(self.bends):
            if step >= total - 1:
                return self.shape_steps - 1  # exactly the shape's last step: its final rate, not one rounded near it
            if step >= at:
                return start + (step - at) * (self.shape_steps - 1 - start) / (total - 1 - at)
        return step

    def lr_at(self, step: int) -> float:
        """The rate used by optimizer step `step` (0-based)."""
        at = self.position(step)
        if at < self.warmup_steps:
            return self.cfg.warmup_lr + (self.peak - self.cfg.warmup_lr) * at / self.warmup_steps
        return SCHEDULES[self.cfg.name].rate(self, at - self.warmup_steps)

    @property
    def lr(self) -> float:
        """The rate the next optimizer step will use."""
        return self.lr_at(self.step_count)

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.step_count += 1
        self._apply()

    def epoch_end(self, loss: float) -> None:
        """Plateau rule: decay by `gamma` after `patience` epochs without a lower loss (the loss of the
        split that selects the best epoch: validation when held out, else test)."""
        if not SCHEDULES[self.cfg.name].watches_loss or self.position(self.step_count) < self.warmup_steps:
            return
        if loss < self.best_loss:
            self.best_loss, self.bad_epochs = loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience:
            self.plateau_scale *= self.cfg.gamma
            self.bad_epochs = 0
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the same curve."""
        return {
            "step_count": self.step_count,
            "plateau_scale": self.plateau_scale,
            "best_loss": self.best_loss,
            "bad_epochs": self.bad_epochs,
            "shape_steps": self.shape_steps,
            "planned": self.planned,
            "bends": [list(b) for b in self.bends],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (a checkpoint from before planned runs keeps the epochs' shape)."""
        if "shape_steps" in state:
            self.lay_over(int(state["shape_steps"]), planned=bool(state["planned"]))
            for at, _, total in state["bends"]:
                self.bend(int(at), int(total))
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best_loss = float(state["best_loss"])
        self.bad_epochs = int(state["bad_epochs"])
        self._apply()

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a group at its own share of the rate (Muon's)
