"""The device data path (`data.pipeline=device`): the training set as one uint8 tensor on the
accelerator (or CPU), augmented a whole batch at a time.

The per-sample torchvision path pays Python overhead for every image (about 130 µs each for
crop + flip + normalize), which on a small machine costs as much as the model itself. Here a
batch is cropped with one gather and flipped with one `where`. Every random draw comes from
a generator seeded by (seed, epoch, step, rank), so runs are exact and resumable mid-epoch.
AutoAugment draws a sub-policy per image, as torchvision's per-sample transform does, and
applies each operation to the group of images that drew it, with torchvision's own op. ColorJitter
has no batched version yet and is refused, not faked.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from torchvision.transforms import v2

from cifar100.errors import UserError
from cifar100.transforms import AUTOAUGMENT_POLICIES, normalize_batch, sample_seed


def random_crop(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by `padding` and cut the original size at per-image offsets (top, left)."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (top[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def flip(images: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip the images where `mask` is true along `dim` (3: horizontal, 2: vertical)."""
    return torch.where(mask[:, None, None, None], images.flip(dim), images)


@dataclass(frozen=True)
class AutoAugmentDraws:
    """Per-image random choices of one batch: sub-policy, whether each of its two ops applies, and signs."""

    policy: torch.Tensor  # int64 (B,)
    applies: torch.Tensor  # bool (B, 2)
    negative: torch.Tensor  # bool (B, 2)


class BatchAutoAugment:
    """torchvision's AutoAugment for a whole batch: each image its own sub-policy, ops applied by group.

    The policies, magnitudes and the operations themselves are taken from a torchvision
    `v2.AutoAugment`, so a group's result is exactly what the per-sample transform would give
    each of its images with the same draws.
    """

    def __init__(self, policy: str):
        self.reference = v2.AutoAugment(AUTOAUGMENT_POLICIES[policy])
        self.policies = self.reference._policies

    def draw(self, batch: int, gen: torch.Generator) -> AutoAugmentDraws:
        """The batch's random choices, drawn on the CPU (so grouping never waits on the device)."""
        return AutoAugmentDraws(torch.randint(len(self.policies), (batch,), generator=gen),
                                torch.rand(batch, 2, generator=gen), torch.rand(batch, 2, generator=gen) <= 0.5)

    def op(self, transform_id: str, magnitude_idx: int, negative: bool, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One of torchvision's AutoAugment operations at one signed magnitude, on a group of images."""
        magnitudes_fn, signed = self.reference._AUGMENTATION_SPACE[transform_id]
        magnitudes = magnitudes_fn(10, *size)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_idx])
        if signed and negative:
            magnitude = -magnitude
        return self.reference._apply_image_or_video_transform(
            images, transform_id, magnitude, interpolation=self.reference.interpolation, fill=self.reference._fill)

    def __call__(self, images: torch.Tensor, draws: AutoAugmentDraws) -> torch.Tensor:
        out = images.clone()
        size = tuple(images.shape[-2:])
        for slot in (0, 1):  # a sub-policy's first op, then its second, as per sample
            for index, policy in enumerate(self.policies):
                transform_id, probability, magnitude_idx = policy[slot]
                chosen = (draws.policy == index) & (draws.applies[:, slot] <= probability)
                signs = (False, True) if self.reference._AUGMENTATION_SPACE[transform_id][1] else (None,)
                for negative in signs:
                    group = chosen if negative is None else chosen & (draws.negative[:, slot] == negative)
                    idx = group.nonzero().flatten()
                    if idx.numel():
                        idx = idx.to(images.device, non_blocking=True)
                        out[idx] = self.op(transform_id, magnitude_idx, bool(negative), out[idx], size)
        return out


class DeviceLoader:
    """Yields (normalized float images, labels) batches of one process's share of each epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, crop_padding: int,
                 hflip: float, vflip: float, color_jitter: float, autoaugment: str,
                 mean: Sequence[float], std: Sequence[float], seed: int, rank: int, world: int,
                 device: torch.device):
        if color_jitter > 0:
            raise UserError("data.pipeline=device has no batched ColorJitter yet: use data.pipeline=reference "
                            "for this recipe")
        self.autoaugment = BatchAutoAugment(autoaugment) if autoaugment != "none" else None
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.crop_padding, self.hflip, self.vflip = crop_padding, hflip, vflip
        self.mean, self.std, self.seed = tuple(mean), tuple(std), seed
        self.device = device
        self.epoch = 0
        self.skip = 0

    def skipping(self, steps: int) -> DeviceLoader:
        """This loader, starting its next epoch at batch `steps` (a mid-epoch resume)."""
        other = copy.copy(self)
        other.skip = steps
        return other

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation the next iteration replays."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.labels.numel() // (self.batch_size * self.world) - self.skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The same permutation on every rank; each rank takes its own slice of each global batch.
        order = torch.randperm(self.labels.numel(), generator=_generator(self.seed, self.epoch))
        step_size = self.batch_size * self.world
        for step in range(self.skip, self.skip + len(self)):
            start = step * step_size + self.rank * self.batch_size
            idx = order[start:start + self.batch_size].to(self.device, non_blocking=True)
            yield self._augment(self.images[idx], step), self.labels[idx]

    def _augment(self, images: torch.Tensor, step: int) -> torch.Tensor:
        gen = _generator(self.seed, self.epoch, step, self.rank)
        b = images.shape[0]
        draws = torch.rand(2, b, generator=gen)
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, b), generator=gen)
        draws, offsets = draws.to(self.device, non_blocking=True), offsets.to(self.device, non_blocking=True)
        if self.crop_padding:
            images = random_crop(images, self.crop_padding, offsets[0], offsets[1])
        if self.hflip:
            images = flip(images, draws[0] < self.hflip, 3)
        if self.vflip:
            images = flip(images, draws[1] < self.vflip, 2)
        if self.autoaugment:
            images = self.autoaugment(images, self.autoaugment.draw(b, gen))
        return normalize_batch(images, self.mean, self.std)


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = sample_seed(seed, part, 0x5EED)
    return torch.Generator().manual_seed(seed)
