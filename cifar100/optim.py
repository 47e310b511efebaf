"""Optimizers and the learning-rate schedule, stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn

from cifar100.config import OptimConfig, SchedConfig
from cifar100.errors import UserError


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD / Adam / NAdam / AdamW over the model's parameters, fused where torch has a kernel.

    Fused kernels (SGD, Adam, AdamW, on CUDA and CPU) take one launch per step and can skip a
    step on the device (see engine); NAdam has none in torch and runs foreach on CUDA.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Norm scales and biases are 1-D; decaying them only fights the normalisation.
            (no_decay if cfg.no_decay_norm_bias and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    if cfg.name == "sgd":
        sgd = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
        if cfg.momentum:
            # Fused SGD creates its momentum buffers empty and fills them in the first step's kernel,
            # so a skipped first step would leave them unwritten. Zeros give the same first step.
            for param in decay + no_decay:
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return sgd
    betas = tuple(cfg.betas)
    if len(betas) != 2:
        raise UserError(f"optim.betas={list(betas)}: expected two numbers")
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, fused=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=True)
    return torch.optim.NAdam(groups, lr=cfg.lr, betas=betas, foreach=on_cuda or None)


class Schedule:
    """Linear warmup from `warmup_lr` to the peak, then cosine, step or plateau decay.

    `step()` after each optimizer step sets the rate for the next one; `epoch_end(loss)`
    feeds the plateau rule. Its whole state is four numbers, saved with checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, sched: SchedConfig, steps_per_epoch: int, epochs: int):
        self.optimizer = optimizer
        self.peak = optim.lr
        self.cfg = sched
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = round(sched.warmup_epochs * steps_per_epoch)
        if self.warmup_steps > self.total_steps:
            raise UserError(f"sched.warmup_epochs={sched.warmup_epochs} is longer than train.epochs={epochs}")
        self.step_count = 0
        self.plateau_scale = 1.0
        self.best_loss = math.inf
        self.bad_epochs = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The rate used by optimizer step `step` (0-based)."""
        cfg = self.cfg
        if step < self.warmup_steps:
            return cfg.warmup_lr + (self.peak - cfg.warmup_lr) * step / self.warmup_steps
        if cfg.name == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return cfg.min_lr + (self.peak - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "step":
            return self.peak * cfg.gamma ** ((step - self.warmup_steps) // (cfg.step_epochs * self.steps_per_epoch))
        if cfg.name == "plateau":
            return max(cfg.min_lr, self.peak * self.plateau_scale)
        return self.peak

    @property
    def lr(self) -> float:
        """The rate the next optimizer step will use."""
        return self.lr_at(self.step_count)

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.step_count += 1
        self._apply()

    def epoch_end(self, loss: float) -> None:
        """Plateau rule: decay by `gamma` after `patience` epochs without a lower loss."""
        if self.cfg.name != "plateau" or self.step_count < self.warmup_steps:
            return
        if loss < self.best_loss:
            self.best_loss, self.bad_epochs = loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience:
            self.plateau_scale *= self.cfg.gamma
            self.bad_epochs = 0
            self._apply()

    def state_dict(self) -> dict[str, float]:
        """Everything a resumed run needs to continue the same curve."""
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "best_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore `state_dict()` output."""
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best_loss = float(state["best_loss"])
        self.bad_epochs = int(state["bad_epochs"])
        self._apply()

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
