"""The parts of a run's training step, built from its config in one fixed order: the model (its stem
whitened, in its memory format, on the device), its weight average, the optimizer, Accelerate's wrappers,
the compiled module, the schedule, the batch mixer and the engine. A run builds them (trainer.py) and so
does the benchmark of its step (commands/bench.py): the step a benchmark times is the one a run trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from cifar100.config import Config
from cifar100.data.cifar import NUM_CLASSES
from cifar100.data.mixing import BatchMixer
from cifar100.errors import UserError
from cifar100.training.compile_cache import compiled
from cifar100.training.ema import WeightAverage
from cifar100.training.engine import Engine, StepRules
from cifar100.training.models import model_for_run
from cifar100.training.optim import Schedule, build_optimizer


@dataclass
class StepParts:
    """A run's training step, ready to train."""

    model: nn.Module  # as the step runs it: compiled where train.compile asks
    prepared: nn.Module  # Accelerate's module (DDP's under DDP), uncompiled: what checkpoints hold
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    mixer: BatchMixer
    engine: Engine
    ema: WeightAverage | None
    parameter_count: int
    flops_per_image: int


def build_step(
    cfg: Config,
    accelerator: Accelerator,
    train_images: torch.Tensor,
    steps_per_epoch: int,
    compile_mode: str | None = None,
) -> StepParts:
    """The step `cfg` trains, on `accelerator`'s device, its stem whitened from `train_images` where
    model.whiten asks, its schedule laid over `steps_per_epoch`; compiled in `compile_mode` (None:
    torch's default) where train.compile asks."""
    if cfg.train.ema.select == "ema" and not cfg.train.ema.enabled:
        raise UserError("train.ema.select=ema picks the best epoch by the averaged weights: set train.ema.enabled=true")
    model, parameter_count, flops = model_for_run(cfg, NUM_CLASSES, train_images, accelerator.device)
    # Of the plain module, before any wrapper: DDP's and torch.compile's share its parameters.
    ema = WeightAverage(model, cfg.train.ema) if cfg.train.ema.enabled else None
    optimizer = build_optimizer(model, cfg.optim)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    # Checkpoints hold the uncompiled module's weights, so any run (compiled or not) can load them.
    runs = compiled(prepared, mode=compile_mode) if cfg.train.compile else prepared
    schedule = Schedule(optimizer, cfg.optim, cfg.sched, steps_per_epoch, cfg.train.epochs, cfg.train.steps)
    mixer = BatchMixer.from_config(cfg.augment, NUM_CLASSES)
    engine = Engine(runs, optimizer, schedule, mixer, accelerator, StepRules.from_config(cfg), ema)
    return StepParts(runs, prepared, optimizer, schedule, mixer, engine, ema, parameter_count, flops)
