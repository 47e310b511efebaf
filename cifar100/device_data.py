"""The device data path (`data.pipeline=device`): the training set as one uint8 tensor on the
accelerator (or CPU), augmented a whole batch at a time.

The per-sample torchvision path pays Python overhead for every image (about 130 µs each for
crop + flip + normalize), which on a small machine costs as much as the model itself. Here a
batch is cropped with one gather and flipped with one `where`. Every random draw comes from
a generator seeded by (seed, epoch, step, rank), so runs are exact and resumable mid-epoch.
Operations without a batched version yet (AutoAugment, ColorJitter) are refused, not faked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cifar100.errors import UserError
from cifar100.transforms import normalize_batch, sample_seed


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


class DeviceLoader:
    """Yields (normalized float images, labels) batches of one process's share of each epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, crop_padding: int,
                 hflip: float, vflip: float, color_jitter: float, autoaugment: str,
                 mean: Sequence[float], std: Sequence[float], seed: int, rank: int, world: int,
                 device: torch.device):
        if autoaugment != "none" or color_jitter > 0:
            raise UserError("data.pipeline=device has no batched AutoAugment or ColorJitter yet: "
                            "use data.pipeline=reference for this recipe")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.crop_padding, self.hflip, self.vflip = crop_padding, hflip, vflip
        self.mean, self.std, self.seed = tuple(mean), tuple(std), seed
        self.device = device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation the next iteration replays."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.labels.numel() // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The same permutation on every rank; each rank takes its own slice of each global batch.
        order = torch.randperm(self.labels.numel(), generator=_generator(self.seed, self.epoch))
        step_size = self.batch_size * self.world
        for step in range(len(self)):
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
        return normalize_batch(images, self.mean, self.std)


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = sample_seed(seed, part, 0x5EED)
    return torch.Generator().manual_seed(seed)
