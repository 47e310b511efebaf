"""The device data path (`data.pipeline=device`): the training set as one uint8 tensor on the
accelerator (or CPU), augmented a whole batch at a time.

The per-sample torchvision path pays Python overhead for every image (about 130 µs each for
crop + flip + normalize), which on a small machine costs as much as the model itself. Here a
batch is cropped with one gather and flipped with one `where`. Every random draw comes from
a generator seeded by (seed, epoch, step, rank), so runs are exact and resumable mid-epoch.
AutoAugment draws a sub-policy per image, as torchvision's per-sample transform does. Each of
a sub-policy's two slots then runs once per op type over the images that drew it, each image at
its own signed magnitude: all geometric ops in one `grid_sample` with a matrix per image, the
colour ops as one blend with a factor per image. The results are bit for bit torchvision's.
Grouping and parameters are computed on the host from CPU draws and copied asynchronously, so the
host never waits for the device. ColorJitter has no batched version yet and is refused, not faked.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torchvision
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cifar100.config import AugmentConfig
from cifar100.data.reference import AUTOAUGMENT_POLICIES, flip_parity, mirrored, normalize_batch, sample_seed
from cifar100.errors import UserError


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for the GPU: from pinned memory, as a
    copy from pageable memory may first wait for the stream."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


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
    applies: torch.Tensor  # float (B, 2): uniform draws; slot k applies where below its probability
    negative: torch.Tensor  # bool (B, 2)


class BatchAutoAugment:
    """torchvision's AutoAugment for a whole batch: each image its own sub-policy, ops applied by type.

    The policies and magnitudes are taken from a torchvision `v2.AutoAugment`, and each op
    reproduces torchvision's uint8 arithmetic, so every image comes out exactly as the
    per-sample transform would give it with the same draws.
    """

    def __init__(self, policy: str):
        self.policies, self.space = checked_tables(v2.AutoAugment(AUTOAUGMENT_POLICIES[policy]))
        self.ops = tuple(self.space)
        # Per sub-policy and slot, as CPU tables the draws index: op, probability and magnitude bin.
        self.op_ids = torch.tensor([[self.ops.index(name) for name, _, _ in sub] for sub in self.policies])
        self.probability = torch.tensor([[p for _, p, _ in sub] for sub in self.policies])
        self.bins = torch.tensor([[b or 0 for _, _, b in sub] for sub in self.policies])
        self.signed = torch.tensor([signed for _, signed in self.space.values()])
        self.geometric = torch.tensor([self.ops.index(name) for name in _GEOMETRIC])

    def draw(self, batch: int, gen: torch.Generator) -> AutoAugmentDraws:
        """The batch's random choices, drawn on the CPU (so grouping never waits on the device)."""
        return AutoAugmentDraws(
            torch.randint(len(self.policies), (batch,), generator=gen),
            torch.rand(batch, 2, generator=gen),
            torch.rand(batch, 2, generator=gen) <= 0.5,
        )

    def __call__(self, images: torch.Tensor, draws: AutoAugmentDraws) -> torch.Tensor:
        """Augment a uint8 (B, 3, H, W) batch on its device; the host never waits for the device."""
        out = images.clone()
        h, w = images.shape[-2:]
        # (op, bin) -> unsigned magnitude at this size; ops without one get 0.0, as in torchvision.
        magnitudes = torch.stack(
            [
                torch.zeros(10, dtype=torch.float64) if m is None else m.double()
                for m in (fn(10, h, w) for fn, _ in self.space.values())
            ]
        )
        for slot in (0, 1):  # a sub-policy's first op, then its second, as per sample
            op = self.op_ids[draws.policy, slot]
            magnitude = magnitudes[op, self.bins[draws.policy, slot]]
            magnitude = torch.where(self.signed[op] & draws.negative[:, slot], -magnitude, magnitude)
            applies = draws.applies[:, slot] <= self.probability[draws.policy, slot]
            groups = [("geometric", applies & torch.isin(op, self.geometric))]
            groups += [(name, applies & (op == self.ops.index(name))) for name in _PIXEL_OPS]
            for name, chosen in groups:
                chosen = chosen.nonzero().flatten()
                if not chosen.numel():
                    continue
                idx = to_device(chosen, images.device)
                if name == "geometric":
                    out[idx] = _warp(out[idx], self._geometric_matrices(op[chosen], magnitude[chosen], h, w))
                else:
                    out[idx] = _PIXEL_OPS[name](out[idx], magnitude[chosen])
        return out

    def _geometric_matrices(self, op: torch.Tensor, magnitude: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Each image's inverse matrix, from the arguments AutoAugment passes F.affine or F.rotate for its op."""

        def only(name: str, value: torch.Tensor) -> torch.Tensor:
            return torch.where(op == self.ops.index(name), value, 0.0)

        shear = magnitude.atan() * _DEGREES  # AutoAugment shears by the angle whose tangent is the magnitude
        sheared = (op == self.ops.index("ShearX")) | (op == self.ops.index("ShearY"))
        return _inverse_affine(
            angle=only("Rotate", -magnitude.remainder(360)),  # rotate turns the other way from affine
            shear=(only("ShearX", shear), only("ShearY", shear)),
            translate=(only("TranslateX", magnitude.trunc()), only("TranslateY", magnitude.trunc())),
            # Shears turn about the top-left corner, the rest about the centre (the origin here).
            center=(torch.where(sheared, -0.5 * w, 0.0).double(), torch.where(sheared, -0.5 * h, 0.0).double()),
        )


def checked_tables(reference: v2.AutoAugment) -> tuple[list, dict]:
    """The sub-policies and magnitude space of a torchvision AutoAugment. torchvision keeps them in
    private attributes, so their shape is checked here: a torchvision that changed them stops with
    one line before training, not with a wrong batch."""
    policies = getattr(reference, "_policies", None)
    space = getattr(reference, "_AUGMENTATION_SPACE", None)
    ops = (*_GEOMETRIC, *_PIXEL_OPS)
    ok = (
        isinstance(space, dict)
        and all(name in space for name in ops)
        and all(
            isinstance(v, tuple) and len(v) == 2 and callable(v[0]) and isinstance(v[1], bool) for v in space.values()
        )
        and isinstance(policies, list)
        and len(policies) > 0
        and all(
            len(sub) == 2
            and all(
                len(slot) == 3 and slot[0] in space and 0.0 <= slot[1] <= 1.0 and (slot[2] is None or 0 <= slot[2] < 10)
                for slot in sub
            )
            for sub in policies
        )
    )
    if not ok:
        raise UserError(
            f"torchvision {torchvision.__version__}: AutoAugment's policy tables are not in the form "
            "data.pipeline=device reads (tested with torchvision 0.19 to 0.29); use "
            "data.pipeline=reference"
        )
    return cast(list, policies), cast(dict, space)  # `ok` checked that they are a list and a dict


_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_RADIANS, _DEGREES = math.pi / 180.0, 180.0 / math.pi  # the factors math.radians and math.degrees use


def _inverse_affine(
    angle: torch.Tensor,
    shear: tuple[torch.Tensor, torch.Tensor],
    translate: tuple[torch.Tensor, torch.Tensor],
    center: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Per image, the (2, 3) matrix that maps output pixels back to input pixels, in float64.

    The affine map is translate . center . rotate . shear-y . shear-x . center^-1 (angles in
    degrees, coordinates relative to the image centre), as torchvision's F.affine defines it;
    the operations run in torchvision's order so the float32 matrices come out identical.
    """
    rot, shear_x, shear_y = angle * _RADIANS, shear[0] * _RADIANS, shear[1] * _RADIANS
    cos_y, tan_x = shear_y.cos(), shear_x.tan()
    # The forward 2x2 part [[a, b], [c, d]]: its determinant is 1, so its inverse is [[d, -b], [-c, a]].
    a = (rot - shear_y).cos() / cos_y
    b = -(a * tan_x + rot.sin())
    c = (rot - shear_y).sin() / cos_y
    d = rot.cos() - c * tan_x
    cx, cy = center
    x, y = cx + translate[0], cy + translate[1]
    rows = [d, -b, cx - d * x + b * y, -c, a, cy + c * x - a * y]
    return torch.stack(rows, dim=1).view(-1, 2, 3)


def _warp(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Resample each image through its inverse matrix as torchvision does: nearest pixel, zeros outside."""
    n, _, h, w = images.shape
    # torchvision's grid: pixel centres relative to the image centre, mapped, then scaled to [-1, 1].
    theta = inverse.float().transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])
    theta = to_device(theta.contiguous(), images.device)
    xs = torch.arange(w, dtype=torch.float32, device=images.device) - (w - 1) * 0.5
    ys = torch.arange(h, dtype=torch.float32, device=images.device) - (h - 1) * 0.5
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones_like(xs).expand(h, w)], dim=-1)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta).view(n, h, w, 2)
    # Zeros outside: AutoAugment's default fill is None, which torchvision leaves to the zero padding.
    warped = torch.nn.functional.grid_sample(
        images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return warped.to(torch.uint8)  # nearest only copies pixels or zeros: already whole numbers


def _per_image(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host values, one row per image, as a device tensor that broadcasts over (B, 3, H, W)."""
    return to_device(values[..., None, None, None], device)


def _fused(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x + alpha * y rounded once to float32, the fused multiply-add of torchvision's `add_(y, alpha=)`.

    For uint8 pixels and AutoAugment's factors float64 holds the sum exactly, so one
    rounding to float32 gives the fused result on any device.
    """
    return (x.double() + y.double() * alpha.double()).float()


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 blend: images * factor + other * (1 - factor), clamped and truncated."""
    ratio, alpha = _per_image(torch.stack([factor, 1.0 - factor], dim=1).float(), images.device).unbind(1)
    return _fused(images * ratio, other, alpha).clamp_(0, 255).to(torch.uint8)


def _brightness(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    factor = _per_image((1.0 + magnitude).float(), images.device)
    return (images * factor).clamp_(0, 255).to(torch.uint8)


def _color(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    # uint8 grayscale truncates, the floor torchvision takes of its float grayscale.
    return _blend(images, F.rgb_to_grayscale(images).float(), 1.0 + magnitude)


def _contrast(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    mean = F.rgb_to_grayscale(images).float().mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, 1.0 + magnitude)


def _sharpness(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's sharpness: the interior blended with a 3x3 blur (weights 1, centre 5, over 13), edges kept."""
    x = images.float()
    box = torch.nn.functional.avg_pool2d(x, 3, stride=1, divisor_override=1)
    # The weighted sum S is a whole number and S / 13 is never within 1/26 of a half, so rounding
    # the exact quotient equals rounding torchvision's float convolution, whatever its order.
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4).div_(13).round_()
    # torchvision adds (1 - factor) * (blurred - x) to x, fused; on the edges blurred - x is 0.
    alpha = _per_image((1.0 - (1.0 + magnitude)).float(), images.device)
    return _fused(x, blurred - x, alpha).clamp_(0, 255).to(torch.uint8)


def _posterize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    bits = magnitude.long()  # keep the top `bits` bits of each channel
    return images & _per_image(((255 << (8 - bits)) & 255).to(torch.uint8), images.device)


def _solarize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    threshold = _per_image((255 * magnitude).float(), images.device)  # compared in float32, as torchvision does
    return torch.where(images >= threshold, F.invert(images), images)


_PIXEL_OPS = {
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": lambda images, _: F.autocontrast(images),
    "Equalize": lambda images, _: F.equalize(images),
    "Invert": lambda images, _: F.invert(images),
}


class DeviceLoader:
    """Yields (normalized float images, labels) batches of one process's share of each epoch."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        augment: AugmentConfig,
        *,
        seed: int,
        rank: int,
        world: int,
        device: torch.device,
    ):
        if augment.color_jitter > 0:
            raise UserError(
                "data.pipeline=device has no batched ColorJitter yet: use data.pipeline=reference for this recipe"
            )
        self.autoaugment = BatchAutoAugment(augment.autoaugment) if augment.autoaugment != "none" else None
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        alternating = augment.hflip == "alternating"
        self.crop_padding, self.vflip = augment.crop_padding, augment.vflip
        self.hflip = 0.0 if alternating else float(augment.hflip)
        # augment.hflip=alternating: each image's parity bit, indexed by the batch's image indices.
        self.parity = flip_parity(seed, self.labels.numel()).to(device) if alternating else None
        self.mean, self.std, self.seed = tuple(augment.mean), tuple(augment.std), seed
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
            idx = to_device(order[start : start + self.batch_size], self.device)
            yield self._augment(self.images[idx], step, idx), self.labels[idx]

    def _augment(self, images: torch.Tensor, step: int, idx: torch.Tensor) -> torch.Tensor:
        gen = _generator(self.seed, self.epoch, step, self.rank)
        b = images.shape[0]
        draws = torch.rand(2, b, generator=gen)
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, b), generator=gen)
        draws, offsets = to_device(draws, self.device), to_device(offsets, self.device)
        if self.crop_padding:
            images = random_crop(images, self.crop_padding, offsets[0], offsets[1])
        if self.hflip:
            images = flip(images, draws[0] < self.hflip, 3)
        if self.parity is not None:
            images = flip(images, mirrored(self.parity[idx], self.epoch), 3)
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
