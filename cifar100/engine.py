"""One training epoch and one exact evaluation: functions of the model, the data and the state.

Metrics are summed in device tensors and read once per epoch (a `.item()` per step would make
the GPU wait for the host); the progress bar reads the loss only every `PROGRESS_EVERY` steps.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from cifar100.mixing import BatchMixer, soft_target_cross_entropy
from cifar100.optim import Schedule
from cifar100.transforms import normalize_batch

PROGRESS_EVERY = 10


@dataclass(frozen=True)
class EpochResult:
    """Training metrics of one epoch, averaged over every image of every process."""

    loss: float
    top1: float
    images: int
    seconds: float
    images_per_rank: tuple[int, ...]


@dataclass
class EpochProgress:
    """Where an epoch stands on this rank: batches done, running sums, time; saved mid-epoch."""

    step: int = 0
    sums: torch.Tensor | None = None  # float64 [loss x images, correct, images] on the device
    seconds: float = 0.0
    bad_steps: int = 0

    def state_dict(self) -> dict:
        """Plain data for a checkpoint."""
        return {"step": self.step, "sums": self.sums.cpu(), "seconds": self.seconds, "bad_steps": self.bad_steps}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> EpochProgress:
        """Rebuild what `state_dict()` saved."""
        return cls(int(state["step"]), state["sums"].to(device), float(state["seconds"]), int(state["bad_steps"]))


class NonFiniteLoss(Exception):
    """The loss was NaN or infinite on some rank more often than `train.max_bad_steps` allows."""


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    mixer: BatchMixer,
    accelerator: Accelerator,
    *,
    epoch: int,
    seed: int,
    clip_grad: float | None,
    channels_last: bool,
    progress: bool,
    state: EpochProgress,
    stop_requested: Callable[[], bool],
    max_bad_steps: int,
    after_step: Callable[[EpochProgress], None],
) -> EpochResult | None:
    """Train over `loader` (which already skips the `state.step` batches done before a resume).

    Returns the epoch's loss and top-1 against the unmixed labels, or None when a stop was
    requested: then `state` says exactly where the epoch stands. Each step, all ranks agree on
    two flags at once (a non-finite loss anywhere, a pending signal anywhere): one small sync.
    """
    model.train()
    device = accelerator.device
    if state.sums is None:
        state.sums = torch.zeros(3, device=device, dtype=torch.float64)
    steps = state.step + len(loader)
    bar = tqdm(total=steps, initial=state.step, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter() - state.seconds
    for step, (images, labels) in enumerate(loader, start=state.step):
        rng = np.random.default_rng([seed, epoch, step, accelerator.process_index])
        images, targets = mixer(images, labels, rng)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(images)
            loss = soft_target_cross_entropy(logits.float(), targets)
            accelerator.backward(loss)
            flags = torch.stack([(~torch.isfinite(loss.detach())).double(),
                                 torch.tensor(float(stop_requested()), device=device, dtype=torch.float64)])
            bad, stop = (accelerator.reduce(flags, reduction="sum") > 0).tolist()
            if bad:
                # The wrapped optimizer's zero_grad waits for a sync step; this step's gradients must go now.
                getattr(optimizer, "optimizer", optimizer).zero_grad(set_to_none=True)
                state.bad_steps += 1
                where = f"epoch {epoch}, step {step}, lr {schedule.lr:.3g}"
                if state.bad_steps > max_bad_steps:
                    raise NonFiniteLoss(f"non-finite loss at {where}")
                warnings.warn(f"non-finite loss at {where}: step skipped "
                              f"({state.bad_steps} of train.max_bad_steps={max_bad_steps})", stacklevel=2)
            else:
                if accelerator.sync_gradients and clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    schedule.step()
                n = labels.shape[0]
                state.sums[0] += loss.detach().double() * n
                state.sums[1] += (logits.detach().argmax(1) == labels).sum()
                state.sums[2] += n
        state.step = step + 1
        state.seconds = time.perf_counter() - start
        if not bar.disable and (step % PROGRESS_EVERY == 0 or step == steps - 1):
            rate = state.sums[2].item() * accelerator.num_processes / max(state.seconds, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.lr:.2e}", img_s=f"{rate:.0f}")
        bar.update(1)
        if accelerator.sync_gradients:
            after_step(state)
        if stop and accelerator.sync_gradients:  # never between micro-steps: their gradients are not saved
            bar.close()
            return None
    bar.close()
    # Gathered rather than summed: the per-rank counts prove every process trained.
    per_rank = accelerator.gather(state.sums[None]).view(-1, 3)
    loss_total, correct_total, seen_total = per_rank.sum(0).tolist()
    return EpochResult(loss_total / seen_total, correct_total / seen_total, int(seen_total),
                       state.seconds, tuple(int(n) for n in per_rank[:, 2].tolist()))


@dataclass(frozen=True)
class EvalResult:
    """Exact metrics over a whole split; `logits` is filled only when asked for."""

    loss: float
    top1: float
    top5: float
    images: int
    logits: torch.Tensor | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    accelerator: Accelerator,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    channels_last: bool,
    tta_flip: bool = False,
    keep_logits: bool = False,
) -> EvalResult:
    """Evaluate on uint8 `images`; under DDP each rank takes a disjoint shard, so no image counts twice."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = torch.arange(rank, images.shape[0], world)
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    hits = torch.zeros(2, device=device, dtype=torch.int64)
    kept = []
    for chunk in shard.split(batch_size):
        x = normalize_batch(images[chunk].to(device, non_blocking=True), mean, std)
        y = labels[chunk].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits[0] += (top5[:, 0] == y).sum()
        hits[1] += (top5 == y[:, None]).any(1).sum()
        if keep_logits:
            kept.append(logits.cpu())
    model.train()
    count = torch.tensor(float(shard.numel()), device=device, dtype=torch.float64)
    totals = accelerator.reduce(torch.cat([loss_sum[None], hits.double(), count[None]]), reduction="sum")
    loss_total, top1, top5, n = totals.tolist()
    logits_all = _gather_in_order(kept, shard, images.shape[0], accelerator) if keep_logits else None
    return EvalResult(loss_total / n, top1 / n, top5 / n, int(n), logits_all)


def _gather_in_order(kept: list[torch.Tensor], shard: torch.Tensor, total: int, accelerator: Accelerator) -> torch.Tensor:
    """All ranks' logits back in dataset order (shards are strided, so interleave them)."""
    mine = torch.cat(kept) if kept else torch.zeros(0)
    if accelerator.num_processes == 1:
        return mine
    padded = torch.zeros(-(-total // accelerator.num_processes), mine.shape[1])
    padded[: mine.shape[0]] = mine
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu().view(accelerator.num_processes, -1, mine.shape[1])
    return gathered.transpose(0, 1).reshape(-1, mine.shape[1])[:total]
