"""One exact evaluation of a split (`evaluate`), and the scoring of a batch that every evaluation and
`cifar100 predict` share (`score_batch`)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from cifar100.config import Config
from cifar100.data.reference import normalize_batch
from cifar100.training.memory import agreed, free_memory, is_out_of_memory


@dataclass(frozen=True)
class EvalResult:
    """Exact metrics over a whole split; `logits` is filled only when asked for."""

    loss: float
    top1: float
    top5: float
    images: int
    logits: torch.Tensor | None = None
    batch_size: int = 0  # the evaluation batch the split was scored at


@dataclass(frozen=True)
class EvalSettings:
    """How every evaluation of a run scores a split: its normalisation, batch, layout and test-time flip."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int = 1024
    channels_last: bool = False
    tta_flip: bool = False  # average each image's logits with its mirror's

    @classmethod
    def from_config(cls, cfg: Config) -> EvalSettings:
        """The settings `cfg` gives its evaluations."""
        return cls(
            cfg.augment.mean, cfg.augment.std, cfg.data.eval_batch_size, cfg.train.channels_last, cfg.eval.tta == "flip"
        )


@torch.no_grad()
def score_batch(
    model: nn.Module, images: torch.Tensor, settings: EvalSettings, accelerator: Accelerator, pad: bool
) -> torch.Tensor:
    """float32 logits of one uint8 (B, 3, H, W) batch on the model's device, as every evaluation
    computes them: normalised, in the settings' memory format, under the accelerator's autocast,
    averaged with the mirror images' when `tta_flip`. `pad`: fill a batch shorter than
    `settings.batch_size` up to it with zeros (and drop their logits)."""
    x = normalize_batch(images, settings.mean, settings.std)
    n = x.shape[0]
    if pad and n < settings.batch_size:
        # A short last batch padded to the others' shape: a compiled model (and a CUDA graph)
        # then sees one shape only. In eval mode no image's result depends on another's.
        x = torch.cat([x, x.new_zeros((settings.batch_size - n, *x.shape[1:]))])
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with accelerator.autocast():
        logits = model(x).float()[:n]
        if settings.tta_flip:
            logits = (logits + model(x.flip(3)).float()[:n]) / 2
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    accelerator: Accelerator,
    settings: EvalSettings,
    *,
    keep_logits: bool = False,
    smaller_on_oom: bool = False,
) -> EvalResult:
    """Evaluate on uint8 `images`; under DDP each rank takes a disjoint shard, so no image counts twice.
    `smaller_on_oom` (train.micro_batch=auto): a pass that runs out of memory on any rank is run again
    by every rank at half the batch, since the scores are exact at any batch; one image that does not
    fit raises the out-of-memory error. The result says the batch that was used."""
    shard = torch.arange(accelerator.process_index, images.shape[0], accelerator.num_processes)
    while True:
        try:
            sums = _shard_sums(model, images, labels, shard, accelerator, settings, keep_logits)
        except BaseException as err:
            if not (smaller_on_oom and is_out_of_memory(err)):
                raise
            traceback.clear_frames(err.__traceback__)  # the frames hold the failed batch's tensors
            sums = None
            free_memory()
        if not smaller_on_oom or agreed(accelerator, sums is not None):
            break
        if settings.batch_size == 1:
            raise MemoryError("not even one image's evaluation fits")
        settings = replace(settings, batch_size=settings.batch_size // 2)
    assert sums is not None
    loss_sum, hits, kept = sums
    device = accelerator.device
    count = torch.tensor(float(shard.numel()), device=device, dtype=torch.float64)
    totals = accelerator.reduce(torch.cat([loss_sum[None], hits.double(), count[None]]), reduction="sum")
    loss_total, top1, top5, n = totals.tolist()
    logits_all = _gather_in_order(kept, shard, images.shape[0], accelerator) if keep_logits else None
    return EvalResult(loss_total / n, top1 / n, top5 / n, int(n), logits_all, settings.batch_size)


def _shard_sums(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    shard: torch.Tensor,
    accelerator: Accelerator,
    settings: EvalSettings,
    keep_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """This rank's summed loss, top-1 and top-5 hits (and its logits, when kept) over `shard`; no collective."""
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    hits = torch.zeros(2, device=device, dtype=torch.int64)
    kept = []
    batch_size = settings.batch_size
    model.eval()
    try:
        for chunk in shard.split(batch_size):
            y = labels[chunk].to(device, non_blocking=True)
            logits = score_batch(
                model, images[chunk].to(device, non_blocking=True), settings, accelerator, shard.numel() > batch_size
            )
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits[0] += (top5[:, 0] == y).sum()
            hits[1] += (top5 == y[:, None]).any(1).sum()
            if keep_logits:
                kept.append(logits.cpu())
    finally:
        model.train()
    return loss_sum, hits, kept


def _gather_in_order(
    kept: list[torch.Tensor], shard: torch.Tensor, total: int, accelerator: Accelerator
) -> torch.Tensor:
    """All ranks' logits back in dataset order (shards are strided, so interleave them)."""
    mine = torch.cat(kept) if kept else torch.zeros(0)
    if accelerator.num_processes == 1:
        return mine
    padded = torch.zeros(-(-total // accelerator.num_processes), mine.shape[1])
    padded[: mine.shape[0]] = mine
    gathered = (
        accelerator.gather(padded.to(accelerator.device)).cpu().view(accelerator.num_processes, -1, mine.shape[1])
    )
    return gathered.transpose(0, 1).reshape(-1, mine.shape[1])[:total]
