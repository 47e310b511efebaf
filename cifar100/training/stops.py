"""How a run ends before its last step, every process at the same point: a stop signal that reached any
process (while setting up: with nothing left behind; while training: after a checkpoint), and
`train.pause_at_step` (a checkpoint at that exact step, then the process ends; resume=auto goes on)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from cifar100.preemption import Preempted, StopFlag
from cifar100.training.optim import Schedule


class Paused(Exception):
    """train.pause_at_step reached mid-epoch, its checkpoint taken: the epoch loop ends here."""


class Stops:
    """This process's stop flag (the signals it caught) and the run's pause step."""

    def __init__(self, accelerator: Accelerator, flag: StopFlag, pause_at_step: int):
        self.accelerator, self.flag, self.pause_at_step = accelerator, flag, pause_at_step

    def requested(self) -> bool:
        """Whether a stop signal reached any process (every process asks at the same point)."""
        acc = self.accelerator
        return acc.reduce(torch.tensor(float(bool(self.flag)), device=acc.device), reduction="sum").item() > 0

    def while_setting_up(self) -> None:
        """End a start that a stop reached before training: no folder, checkpoint or scratch is left."""
        if self.requested():
            raise self.preempted("while setting up, before this start trained or wrote anything")

    def preempted(self, where: str) -> Preempted:
        """The error that ends the run, stopped `where`."""
        return Preempted(f"stopped by {self.flag.name or 'a signal on another rank'} {where}", self.flag.signal)

    def pausing(self, schedule: Schedule) -> bool:
        """Whether `train.pause_at_step` is the step just taken (and not the run's last)."""
        return 0 < self.pause_at_step == schedule.step_count < schedule.total_steps
