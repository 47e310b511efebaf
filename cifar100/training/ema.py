"""Weight averaging: an exponential moving average (EMA) of the model, kept by timm's `ModelEmaV3`.

timm does the averaging (every floating-point parameter and buffer, with its warm-up of the
decay); this module decides when: after every `train.ema.every`-th optimizer step, as a no-op
on a step the engine skipped for a non-finite loss. The skip is known on the device only, so
the update takes it as a tensor: its weight is 0 there, and lerping by 0 leaves every finite
value exactly as it was. Under DDP every rank averages the same synced parameters; only the
norm layers' running statistics differ per rank (each forward pass updates them from its own
batch), so `sync()` gives every rank rank 0's before an evaluation, as DDP does for the model.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from timm.utils import ModelEmaV3
from torch import nn

from cifar100.config import EmaConfig


class WeightAverage:
    """The EMA of `model`'s weights (the plain module: not DDP-wrapped, not compiled)."""

    def __init__(self, model: nn.Module, cfg: EmaConfig):
        self.model, self.every = model, cfg.every
        # warmup_gamma 1 (timm's default): decay after k updates = min(decay, 1 - k ** -power).
        self.average = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup, warmup_power=cfg.warmup_power)

    @property
    def module(self) -> nn.Module:
        """The averaged model, in eval mode, ready to be scored."""
        return self.average.module

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (1-based); the first copies the weights (decay 0)."""
        return self.average.get_decay(update)

    @torch.no_grad()
    def after_step(self, global_step: int, skipped: torch.Tensor) -> None:
        """Average in the weights after optimizer step `global_step` (1-based), unless `skipped`
        (a boolean tensor on the device) says the step was skipped, or it is not an update step."""
        if global_step % self.every:
            return
        decay = self.decay_at(global_step // self.every)
        # Passed as a tensor, so timm's lerp weight (1 - decay) is 0 where the step was skipped: no host wait.
        # timm annotates decay as a float; it only computes lerp's weight 1 - decay, which a tensor can be.
        self.average.apply_update_(self.model, decay=torch.where(skipped, 1.0, decay).float())  # type: ignore[arg-type]

    def sync(self, accelerator: Accelerator) -> None:
        """Give every rank rank 0's averaged buffers (norm statistics); the parameters agree already."""
        if accelerator.num_processes > 1:
            broadcast(list(self.module.buffers()), from_process=0)
