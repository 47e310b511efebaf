"""One training epoch (`Engine.train_epoch`); the evaluations are `evaluation.py`'s.

The host never waits for the step it has just queued, so the GPU is never left idle between
steps. Metrics are summed in device tensors and read once per epoch. Each optimizer step, all
ranks agree on two flags in one small all-reduce (a non-finite loss anywhere, a pending signal
anywhere). A non-finite step is skipped on the device, by the same `found_inf` input that
torch's fused optimizers take from a GradScaler. The host reads each step's flags after it has
queued the next step (at most one step ahead of the GPU) to warn, count or stop. Optimizers
with no fused kernel (NAdam) and fp16 loss scaling read the skip flag before stepping: one
full wait per step.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from cifar100.config import Config
from cifar100.data.mixing import BatchMixer, soft_target_cross_entropy
from cifar100.training.ema import WeightAverage
from cifar100.training.optim import Schedule


@dataclass(frozen=True)
class EpochResult:
    """Training metrics of one epoch, averaged over every image of every process."""

    lr: float  # the rate at the epoch's first step (a resume's first, when it resumed mid-epoch)
    loss: float
    top1: float
    images: int
    seconds: float
    images_per_rank: tuple[int, ...]


@dataclass
class EpochProgress:
    """Where an epoch stands on this rank: batches done, running sums, time; saved mid-epoch."""

    step: int = 0
    sums: torch.Tensor | None = None  # float64 [loss x images, correct, images, skipped steps] on the device
    seconds: float = 0.0

    def state_dict(self) -> dict:
        """Plain data for a checkpoint."""
        # Saved only mid-epoch (step > 0), so after train_epoch has made the sums.
        return {"step": self.step, "sums": cast(torch.Tensor, self.sums).cpu(), "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EpochProgress:
        """Rebuild what `state_dict()` saved (checkpoints before skips were summed on the device kept them apart)."""
        sums = state["sums"]
        if sums.numel() == 3:
            sums = torch.cat([sums, torch.tensor([float(state.get("bad_steps", 0))], dtype=sums.dtype)])
        return cls(int(state["step"]), sums.to(device), float(state["seconds"]))


class NonFiniteLoss(Exception):
    """The loss was NaN or infinite on some rank more often than `train.max_bad_steps` allows."""


@dataclass(frozen=True)
class _StepFlags:
    """One optimizer step's agreed flags on their way to the host, read once the next step is queued."""

    step: int
    lr: float
    values: torch.Tensor  # [non-finite anywhere, stop anywhere, this rank's loss], on the host
    ready: torch.cuda.Event | None

    @classmethod
    def send(cls, step: int, lr: float, values: torch.Tensor) -> _StepFlags:
        if values.device.type != "cuda":
            return cls(step, lr, values, None)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(step, lr, host, ready)

    def read(self) -> tuple[bool, bool, float]:
        if self.ready is not None:
            self.ready.synchronize()
        bad, stop, loss = self.values.tolist()
        return bad > 0, stop > 0, loss


@dataclass(frozen=True)
class StepRules:
    """How every optimizer step of a run is taken: read from the config once, the same in each epoch."""

    seed: int
    clip_grad: float | None = None
    channels_last: bool = False
    max_bad_steps: int = 0  # non-finite losses skipped in an epoch before NonFiniteLoss
    progress: bool = False  # the progress bar, on the main process
    micro_batch: int | None = None  # images per forward and backward; None: a process's whole batch at once
    sizes: tuple[tuple[float, ...], ...] = ()  # data.sizes: [size, fraction of the run] phases

    @classmethod
    def from_config(cls, cfg: Config) -> StepRules:
        """The rules `cfg` sets."""
        return cls(
            cfg.seed,
            cfg.train.clip_grad,
            cfg.train.channels_last,
            cfg.train.max_bad_steps,
            cfg.log.progress,
            sizes=cfg.data.sizes,
        )


def phase_size(sizes: tuple[tuple[float, ...], ...], progress: float) -> int | None:
    """The training image size of `data.sizes` at `progress` (0..1) through the run; None without phases."""
    reached = 0.0
    for size, fraction in sizes:
        reached += fraction
        if progress < reached:
            return int(size)
    return int(sizes[-1][0]) if sizes else None


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """A normalised batch scaled to `size` px square (bilinear, antialiased when shrinking); as it is at
    its own size or None. Scaling is linear, so it commutes with the normalisation before it."""
    if size is None or images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class _Batches(Protocol):
    """What an epoch steps through: batches with a known count (a loader, or a list in tests)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


class Engine:
    """What trains an epoch: the run's parts, built once by the trainer, and its step rules. The
    micro-batch (`rules.micro_batch` to begin with) is the one part a run sets later, once fitted."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        mixer: BatchMixer,
        accelerator: Accelerator,
        rules: StepRules,
        ema: WeightAverage | None = None,  # averaged after each optimizer step that is not skipped
    ):
        self.model, self.optimizer, self.schedule, self.mixer = model, optimizer, schedule, mixer
        self.accelerator, self.rules, self.ema = accelerator, rules, ema
        self.micro_batch = rules.micro_batch  # images per forward and backward; None: the whole batch

    def train_epoch(
        self,
        epoch: int,
        batches: _Batches,
        state: EpochProgress,
        *,
        stop_requested: Callable[[], bool] = lambda: False,
        after_step: Callable[[EpochProgress], None] = lambda state: None,
        run_left: Callable[[], str | None] = lambda: None,
    ) -> EpochResult | None:
        """Train epoch `epoch` over `batches` (which already skip the `state.step` batches done before a resume).

        The epoch ends early at the schedule's last step. Returns the epoch's loss and top-1 against
        the unmixed labels, or None when a stop was
        requested: a signal during optimizer step k stops the epoch after step k + 1, and `state`
        says exactly where it stands. A non-finite loss skips its optimizer step on every rank
        (the schedule still advances) and its images are not counted; more than
        `rules.max_bad_steps` in an epoch raise NonFiniteLoss. `after_step` runs after each
        optimizer step; `run_left` is the whole run's estimated time left, shown on the bar once
        it has one.
        """
        model, accelerator = self.model, self.accelerator
        model.train()
        if state.sums is None:
            state.sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)
        bar = self._bar(epoch, state.step, state.step + len(batches))
        steps = _Stepper(self, state, bar, epoch=epoch, run_left=run_left)
        start = time.perf_counter() - state.seconds
        lr = self.schedule.lr_at(self.schedule.step_count - state.step // accelerator.gradient_accumulation_steps)
        for step, (images, labels) in enumerate(batches, start=state.step):
            images, targets = self._prepare(images, labels, epoch, step)
            stop = False
            with accelerator.accumulate(model):
                self._forward_backward(images, targets, labels, steps)
                if accelerator.sync_gradients:
                    stop = steps.optimizer_step(step, stop_requested())
            state.step = step + 1
            state.seconds = time.perf_counter() - start
            bar.update(1)
            if accelerator.sync_gradients:
                after_step(state)
            if stop:
                steps.settle_last()
                bar.close()
                return None
            if self.schedule.step_count >= self.schedule.total_steps:
                break  # a planned run's last step may fall inside an epoch: that epoch ends here
        steps.settle_last()  # a stop flagged by the last step is seen by the caller's own check
        bar.close()
        return self._epoch_result(epoch, lr, state.sums, state.seconds)

    def _bar(self, epoch: int, done: int, total: int) -> tqdm:
        """The epoch's progress bar, `done` of its `total` batches behind it (on the main process only)."""
        return tqdm(
            total=total,
            initial=done,
            desc=f"epoch {epoch}",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.rules.progress and self.accelerator.is_main_process),
        )

    def _prepare(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` of `epoch` as the model trains on it: mixed (seeded by its position), resized to
        its phase, in the memory format the rules ask for; with its targets."""
        rules = self.rules
        rng = np.random.default_rng([rules.seed, epoch, step, self.accelerator.process_index])
        images, targets = self.mixer(images, labels, rng)
        # Progressive resizing follows the schedule's position, so a planned or re-planned run
        # (and a resume) passes its phases at the same share of its steps.
        schedule = self.schedule
        images = resize(images, phase_size(rules.sizes, schedule.position(schedule.step_count) / schedule.shape_steps))
        if rules.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def _epoch_result(self, epoch: int, lr: float, sums: torch.Tensor, seconds: float) -> EpochResult:
        """The epoch's figures over every process from each one's `sums`; NonFiniteLoss when no step counted."""
        # Gathered rather than summed: the per-rank counts prove every process trained.
        per_rank = self.accelerator.gather(sums[None, :3]).view(-1, 3)
        loss_total, correct_total, seen_total = per_rank.sum(0).tolist()
        if not seen_total:
            raise NonFiniteLoss(f"non-finite loss in every step of epoch {epoch}")
        return EpochResult(
            lr,
            loss_total / seen_total,
            correct_total / seen_total,
            int(seen_total),
            seconds,
            tuple(int(n) for n in per_rank[:, 2].tolist()),
        )

    def _forward_backward(
        self, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, steps: _Stepper
    ) -> None:
        """Forward and backward of one process's batch, in micro-batches of `micro_batch` (the
        last may be smaller): each loss weighted by its share of the batch, so the summed gradient is
        the batch's mean, and gradients all-reduced (under DDP) only after the last."""
        model, accelerator = self.model, self.accelerator
        n = images.shape[0]
        size = self.micro_batch or n
        pieces = list(zip(images.split(size), targets.split(size), labels.split(size)))
        for i, (x, t, y) in enumerate(pieces):
            with accelerator.no_sync(model) if i < len(pieces) - 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    logits = model(x)
                loss = soft_target_cross_entropy(logits.float(), t)
                # One piece: the loss as it is, so a run without micro-batches is bit-identical.
                accelerator.backward(loss if len(pieces) == 1 else loss * (y.shape[0] / n))
            steps.count(loss.detach(), logits.detach(), y)


class _Stepper:
    """The optimizer steps of one epoch: sums kept on the device, the agreed flags of each step read
    by the host one step late (to warn, count, or stop), a non-finite step skipped on the device."""

    def __init__(
        self, engine: Engine, state: EpochProgress, bar: tqdm, *, epoch: int, run_left: Callable[[], str | None]
    ):
        self.model, self.schedule, self.accelerator = engine.model, engine.schedule, engine.accelerator
        self.optimizer, self.base = engine.optimizer, getattr(engine.optimizer, "optimizer", engine.optimizer)
        self.clip_grad, self.max_bad_steps, self.ema = engine.rules.clip_grad, engine.rules.max_bad_steps, engine.ema
        self.state, self.bar, self.epoch, self.run_left = state, bar, epoch, run_left
        accelerator = engine.accelerator
        self.skips_on_device = getattr(self.base, "_step_supports_amp_scaling", False) and accelerator.scaler is None
        device = accelerator.device
        self.off_on = torch.tensor([0.0, 1.0], device=device, dtype=torch.float64)  # indexed by the stop flag: no copy
        self.bad_since_step = torch.zeros((), device=device, dtype=torch.float64)
        self.step_sums = torch.zeros(3, device=device, dtype=torch.float64)  # this optimizer step's micro-batches
        self.bad_steps = int(cast(torch.Tensor, state.sums)[3].item())  # train_epoch made the sums
        self.pending: _StepFlags | None = None
        self.began, self.images_seen = time.perf_counter(), 0
        self.last_loss = torch.zeros((), device=device)

    def count(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one micro-batch's loss, hits and size to the step's sums, on the device."""
        n = labels.shape[0]
        device = self.step_sums.device
        self.step_sums += torch.stack(
            [
                loss.double() * n,
                (logits.argmax(1) == labels).sum().double(),
                torch.full((), n, device=device, dtype=torch.float64),
            ]
        )
        self.bad_since_step += (~torch.isfinite(loss)).double()
        self.images_seen += n
        self.last_loss = loss

    def optimizer_step(self, step: int, stop_requested: bool) -> bool:
        """Step (or skip, where any rank's loss was not finite) and queue the flags; True when the
        previous step's flags asked for a stop."""
        flags = self.accelerator.reduce(
            torch.stack([self.bad_since_step, self.off_on[int(stop_requested)]]), reduction="sum"
        )
        self.bad_since_step.zero_()
        skip = flags[0] > 0
        step_or_skip(self.optimizer, skip, self.skips_on_device, self._clip)
        if self.ema is not None:
            self.ema.after_step(self.schedule.step_count + 1, skip)
        # The wrapped optimizer's zero_grad waits for a sync step; this is one, so clear directly.
        self.base.zero_grad(set_to_none=True)
        # A step skipped anywhere counts nowhere, so every rank's image count stays the same.
        sums = cast(torch.Tensor, self.state.sums)  # made by train_epoch before its first step
        sums[:3] += torch.where(skip, 0.0, self.step_sums)
        sums[3] += skip.double()
        self.step_sums.zero_()
        now = _StepFlags.send(step, self.schedule.lr, torch.cat([flags, self.last_loss.double()[None]]))
        self.schedule.step()
        stop = self.pending is not None and self._settle(self.pending)
        self.pending = now
        return stop

    def _clip(self) -> None:
        if self.clip_grad:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip_grad)

    def settle_last(self) -> None:
        """Read the flags of the last step queued."""
        if self.pending is not None:
            self._settle(self.pending)
            self.pending = None

    def _settle(self, flags: _StepFlags) -> bool:
        bad, stop, loss = flags.read()
        if bad:
            self.bad_steps += 1
            where = f"epoch {self.epoch}, step {flags.step}, lr {flags.lr:.3g}"
            if self.bad_steps > self.max_bad_steps:
                raise NonFiniteLoss(f"non-finite loss at {where}")
            warnings.warn(
                f"non-finite loss at {where}: step skipped "
                f"({self.bad_steps} of train.max_bad_steps={self.max_bad_steps})",
                stacklevel=4,
            )
            reset_broken_norm_statistics(self.model)
            if self.ema is not None:  # it averaged in the statistics of the step after the skipped one
                reset_broken_norm_statistics(self.ema.module)
        if not self.bar.disable:  # shown at the bar's next refresh: no terminal write per step
            rate = self.images_seen * self.accelerator.num_processes / max(time.perf_counter() - self.began, 1e-9)
            left = self.run_left()
            self.bar.set_postfix(
                loss=f"{loss:.3f}",
                lr=f"{flags.lr:.2e}",
                img_s=f"{rate:.0f}",
                **({"run_left": left} if left else {}),
                refresh=False,
            )
        return stop


def step_or_skip(
    optimizer: torch.optim.Optimizer, skip: torch.Tensor, on_device: bool, before_step: Callable[[], None]
) -> None:
    """The optimizer's step (after `before_step`, the gradient clipping), or none where `skip` (a
    device flag every rank agreed on) is set. With `on_device` (a fused optimizer, no loss scaler)
    `skip` goes in as `found_inf`, the private input torch's fused steps take from a GradScaler, and
    the step is skipped on the device with no wait (test_engine fails if torch stops honouring it);
    any other optimizer reads the flag on the host first."""
    base = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper passes step() through
    if not on_device:
        if not skip.item():
            before_step()
            optimizer.step()
        return
    base.found_inf = skip.float()  # type: ignore[union-attr]  # undeclared in Optimizer's stubs
    try:
        before_step()
        optimizer.step()
    finally:
        del base.found_inf  # type: ignore[union-attr]  # undeclared, as above


def reset_broken_norm_statistics(model: nn.Module) -> None:
    """A skipped step's forward pass still updated the running statistics of the norm layers; where
    that made them NaN or infinite (which no later update can undo), start them afresh."""
    for module in model.modules():
        reset = getattr(module, "reset_running_stats", None)
        stats = [getattr(module, name, None) for name in ("running_mean", "running_var")]
        if reset is not None and None not in stats and not all(torch.isfinite(s).all() for s in stats if s is not None):
            reset()
