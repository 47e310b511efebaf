"""Per-sample image transforms and the dataset that applies them reproducibly.

Images are uint8 CHW tensors kept in memory; augmentation runs per sample in DataLoader
workers with torchvision.transforms.v2 (no PIL). Every random draw of a sample's
augmentation is seeded from (seed, epoch, index) alone, so a run is bit-for-bit
reproducible and resumable mid-epoch whatever the number of workers or which worker
gets which sample.
"""

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from cifar100.config import AugmentConfig
from cifar100.errors import UserError

AUTOAUGMENT_POLICIES = {
    "none": None,
    "cifar10": v2.AutoAugmentPolicy.CIFAR10,
    "imagenet": v2.AutoAugmentPolicy.IMAGENET,
    "svhn": v2.AutoAugmentPolicy.SVHN,
}

_MASK64 = (1 << 64) - 1


def train_transform(cfg: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build the `augment` section's training augmentation for one uint8 (3, H, W) image.

    Order: random crop (zero padding), horizontal flip, vertical flip, colour jitter,
    AutoAugment (on uint8, as torchvision intends), then scale to float32 in [0, 1] and
    normalize. A stage whose parameter is 0 (or "none") is left out. The result draws
    its randomness from torch's global CPU generator; AugmentedDataset seeds that per sample.
    """
    crop_padding, hflip, vflip, color_jitter, autoaugment = (
        cfg.crop_padding,
        0.0 if isinstance(cfg.hflip, str) else cfg.hflip,  # alternating: AugmentedDataset mirrors by its parity
        cfg.vflip,
        cfg.color_jitter,
        cfg.autoaugment,
    )
    if autoaugment not in AUTOAUGMENT_POLICIES:
        raise UserError(f"unknown autoaugment policy {autoaugment!r}; valid: {', '.join(AUTOAUGMENT_POLICIES)}")
    if crop_padding < 0:
        raise UserError(f"crop_padding must be >= 0, got {crop_padding}")
    for name, p in (("hflip", hflip), ("vflip", vflip)):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"{name} must be a probability in [0, 1], got {p}")
    if color_jitter < 0:
        raise UserError(f"color_jitter must be >= 0, got {color_jitter}")

    stages: list[Callable] = []
    if crop_padding > 0:
        stages.append(v2.RandomCrop(32, padding=crop_padding))
    if hflip > 0:
        stages.append(v2.RandomHorizontalFlip(p=hflip))
    if vflip > 0:
        stages.append(v2.RandomVerticalFlip(p=vflip))
    if color_jitter > 0:
        s = color_jitter
        stages.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    policy = AUTOAUGMENT_POLICIES[autoaugment]
    if policy is not None:
        stages.append(v2.AutoAugment(policy))
    return v2.Compose([*stages, *_to_normalized_float(cfg.mean, cfg.std)])


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build the deterministic evaluation transform: uint8 (3, H, W) -> normalized float32."""
    return v2.Compose(_to_normalized_float(mean, std))


def _to_normalized_float(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def normalize_batch(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale a uint8 (B, 3, H, W) batch to float32 and normalize it on the batch's own device.

    Computes ((x / 255) - mean) / std with the same float32 operations as eval_transform
    (multiply by 1/255, subtract, divide), so whole-tensor evaluation matches the
    per-sample path bit for bit.
    """
    # Build on the host and copy asynchronously: torch.tensor(..., device=cuda) would block.
    device = images_uint8.device
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device, non_blocking=True)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device, non_blocking=True)
    return images_uint8.to(torch.float32).mul_(1.0 / 255).sub_(mean_t).div_(std_t)


def _splitmix64(x: int) -> int:
    # SplitMix64 finalizer: a cheap bijective 64-bit hash with good avalanche.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Mix (seed, epoch, index) into a 63-bit torch seed; nearby inputs give unrelated seeds."""
    h = 0
    for value in (seed, epoch, index):
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1


def flip_parity(seed: int, count: int) -> torch.Tensor:
    """augment.hflip=alternating: per image (by its index in the training set), whether it is mirrored
    on odd epochs (and so not on even ones), a seeded hash bit: each image alternates, half start mirrored,
    and an epoch's mirrors depend on the seed, the epoch and the image alone (exact on any resume)."""
    return torch.tensor([sample_seed(seed, -1, i) & 1 for i in range(count)], dtype=torch.bool)


def mirrored(parity: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images of `parity` (flip_parity's bits, or some of them) are mirrored in `epoch`."""
    return parity ^ bool(epoch % 2)


class AugmentedDataset(torch.utils.data.Dataset):
    """In-memory images with a per-sample transform whose randomness depends on (seed, epoch, index) only.

    images: uint8 (N, 3, H, W); labels: integer (N,). `alternate_flips`: mirror image i before its
    transform in the epochs `mirrored` says (augment.hflip=alternating). Call set_epoch before iterating each
    epoch. The epoch lives in a shared-memory tensor, so it reaches persistent DataLoader
    workers too (each holds its own copy of the dataset, but not of that storage).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable, seed: int, alternate_flips: bool = False
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UserError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise UserError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        # Python ints: indexing a list is far cheaper per sample than tensor.item().
        self.labels = [int(y) for y in labels.tolist()]
        self.transform = transform
        self.seed = seed
        # augment.hflip=alternating: each image mirrored before its transform on every other epoch.
        self.parity = [bool(b) for b in flip_parity(seed, len(images))] if alternate_flips else None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose augmentations __getitem__ reproduces."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations __getitem__ reproduces, in every worker."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return (transformed image, label); the caller's global RNG state is left untouched."""
        # Save and restore the CPU generator by hand (what fork_rng(devices=[]) does, minus its
        # per-call accelerator lookup). Seed only the CPU generator: torch.manual_seed would
        # also reseed CUDA, which is not restored here and would disturb the main process.
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
            image = self.images[i]
            if self.parity is not None and self.parity[i] != (self.epoch % 2 == 1):  # as `mirrored`
                image = image.flip(-1)
            image = self.transform(image)
        finally:
            torch.set_rng_state(state)
        return image, self.labels[i]
