"""The training state: everything a resumed run restores, saved and loaded by two mirror methods.

`TrainState.state_dict()` turns model, optimizer, schedule, grad scaler, the averaged weights
(`train.ema`), every rank's RNG and partial-epoch sums, and the run's totals into a `Snapshot`;
`load_state_dict()` puts the same
fields back. The checkpoint module writes and reads snapshots without knowing what is in them.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import Snapshot, apply_weights, step_tag
from cifar100.training.ema import WeightAverage
from cifar100.training.engine import EpochProgress, reset_broken_norm_statistics
from cifar100.training.optim import Schedule


@dataclass
class RunTotals:
    """What the run has done so far, carried across resumes in each checkpoint's meta.json."""

    epochs_done: int = 0
    train_images: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    images_per_rank: list[int] = field(default_factory=list)
    wandb_id: str | None = None
    micro_batch: int | None = None  # images per forward and backward (train.micro_batch), kept on a resume
    eval_batch: int | None = None  # the evaluation batch that fitted, where train.micro_batch=auto lowered it

    def count_epoch(self, images: int, seconds: float, images_per_rank: tuple[int, ...]) -> None:
        """Add an epoch's trained images (each process's apart too) and its seconds."""
        self.train_images += images
        self.train_seconds += seconds
        self.images_per_rank = [a + b for a, b in zip(self.images_per_rank, images_per_rank)]

    @classmethod
    def from_meta(cls, saved: dict) -> RunTotals:
        """The totals a meta.json holds (fields a newer or older version added are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


class TrainState:
    """Model, optimizer, schedule, scaler, averaged weights, this rank's RNG and epoch progress, and
    the run's totals."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        accelerator: Accelerator,
        ema: WeightAverage | None = None,
    ):
        self.model, self.optimizer, self.schedule, self.ema = model, optimizer, schedule, ema
        self.accelerator = accelerator
        self.epoch = 1  # the epoch being trained (1-based)
        self.progress = EpochProgress()
        self.totals = RunTotals(images_per_rank=[0] * accelerator.num_processes)

    @property
    def tag(self) -> str:
        """The name of a checkpoint of this exact position."""
        return step_tag(self.schedule.step_count)

    def end_epoch(self) -> None:
        """Move to the start of the next epoch."""
        self.totals.epochs_done = self.epoch
        self.epoch, self.progress = self.epoch + 1, EpochProgress()

    def state_dict(self) -> Snapshot:
        """This position as a snapshot; every rank calls it (each contributes its RNG and sums)."""
        # A step skipped just before may have broken norm statistics the engine resets only when it
        # reads that step's flags, one step later: a checkpoint must not keep them.
        reset_broken_norm_statistics(self.model)
        if self.ema is not None:
            reset_broken_norm_statistics(self.ema.module)
        mid_epoch = self.progress.step > 0
        mine = {
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "progress": self.progress.state_dict() if mid_epoch else None,
        }
        ranks = gather_object([mine])
        scaler = self.accelerator.scaler
        state = {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ranks": ranks,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        meta = {
            "epoch": self.epoch if mid_epoch else self.totals.epochs_done,
            "step_in_epoch": self.progress.step,
            "global_step": self.schedule.step_count,
            "totals": dataclasses.asdict(self.totals),
        }
        ema = self.ema.module.state_dict() if self.ema is not None else None
        return Snapshot(self.accelerator.get_state_dict(self.model), state, meta, ema)

    def load_state_dict(self, snap: Snapshot, source: Path) -> None:
        """Put back what `state_dict()` saved, on every rank."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        ranks = snap.state["ranks"]
        if len(ranks) != world and any(r["progress"] is not None for r in ranks):
            raise UserError(
                f"{source}: a mid-epoch checkpoint of {len(ranks)} process(es) cannot continue on {world}: "
                f"resume it with {len(ranks)}, or from an epoch-end checkpoint"
            )
        apply_weights(self.accelerator.unwrap_model(self.model), snap.weights, source)
        if self.ema is not None:
            if snap.ema is None:
                raise UserError(
                    f"{source}: holds no averaged weights for train.ema; resume it with "
                    "train.ema.enabled=false, or start a new run"
                )
            apply_weights(self.ema.module, snap.ema, source)
        self.optimizer.load_state_dict(snap.state["optimizer"])
        self.schedule.load_state_dict(snap.state["schedule"])
        if self.accelerator.scaler is not None and snap.state.get("scaler"):
            self.accelerator.scaler.load_state_dict(snap.state["scaler"])
        self.totals = RunTotals.from_meta(snap.meta["totals"])
        self.epoch = self.totals.epochs_done + 1
        if len(self.totals.images_per_rank) != world:
            warnings.warn(
                f"resuming on {world} processes instead of {len(ranks)}: the data order "
                "and per-rank counts differ from an uninterrupted run",
                stacklevel=2,
            )
            self.totals.images_per_rank = [sum(self.totals.images_per_rank)] + [0] * (world - 1)
        mine = ranks[min(rank, len(ranks) - 1)]
        torch.set_rng_state(mine["rng_cpu"])
        if torch.cuda.is_available() and mine["rng_cuda"] is not None:
            torch.cuda.set_rng_state(mine["rng_cuda"])
        self.progress = (
            EpochProgress.from_state(mine["progress"], self.accelerator.device)
            if mine["progress"] is not None
            else EpochProgress()
        )
