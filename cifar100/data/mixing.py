"""Batch-level CutMix / Mixup with label smoothing, and the soft-target loss they need.

All randomness comes from a numpy Generator the caller passes in (so a resumed run
replays the same draws); all tensor work stays on the images' device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cifar100.config import AugmentConfig
from cifar100.errors import UserError


class BatchMixer:
    """Mix each batch with CutMix, Mixup or nothing, and return soft targets.

    Per batch one uniform draw u picks the mode: u < cutmix_prob -> CutMix, else
    u < cutmix_prob + mixup_prob -> Mixup, else no mixing. Each image is mixed with its
    partner, the batch rolled by one (image k with image k-1), as torchvision's v2.CutMix.
    """

    def __init__(
        self,
        num_classes: int,
        cutmix_prob: float,
        cutmix_alpha: float,
        mixup_prob: float,
        mixup_alpha: float,
        label_smoothing: float,
    ):
        if num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {num_classes}")
        for name, p in (("cutmix_prob", cutmix_prob), ("mixup_prob", mixup_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= p <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {p}")
        if cutmix_prob + mixup_prob > 1.0:
            raise UserError(f"cutmix_prob + mixup_prob must be <= 1, got {cutmix_prob} + {mixup_prob}")
        for name, p, alpha in (("cutmix", cutmix_prob, cutmix_alpha), ("mixup", mixup_prob, mixup_alpha)):
            if p > 0 and not alpha > 0:
                raise UserError(f"{name}_alpha must be > 0 when {name}_prob > 0, got {alpha}")
        self.num_classes = num_classes
        self.cutmix_prob = cutmix_prob
        self.cutmix_alpha = cutmix_alpha
        self.mixup_prob = mixup_prob
        self.mixup_alpha = mixup_alpha
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: AugmentConfig, num_classes: int) -> BatchMixer:
        """The mixer the `augment` section asks for."""
        return cls(num_classes, cfg.cutmix.prob, cfg.cutmix.alpha, cfg.mixup.prob, cfg.mixup.alpha, cfg.label_smoothing)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mixed images, float32 soft targets (B, num_classes) on the images' device).

        images: float (B, C, H, W), not modified in place; labels: integer (B,).
        Targets are lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y_partner)),
        where lam is the weight of each image's own content.
        """
        targets = self._smoothed_one_hot(labels.to(images.device, torch.long, non_blocking=True))
        u = rng.random()
        if u < self.cutmix_prob:
            images, lam = self._cutmix(images, rng)
        elif u < self.cutmix_prob + self.mixup_prob:
            images, lam = self._mixup(images, rng)
        else:
            return images, targets
        return images, targets * lam + targets.roll(1, 0) * (1.0 - lam)

    def _smoothed_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        targets = torch.full((len(labels), self.num_classes), off, dtype=torch.float32, device=labels.device)
        return targets.scatter_(1, labels.unsqueeze(1), on)

    def _cutmix(self, images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        # Box of area (1 - lam) * H * W around a uniform centre, clipped to the image; the
        # clipping shrinks it, so lam is recomputed from the area actually pasted.
        lam = rng.beta(self.cutmix_alpha, self.cutmix_alpha)
        h, w = images.shape[-2:]
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        half_h, half_w = 0.5 * math.sqrt(1.0 - lam) * h, 0.5 * math.sqrt(1.0 - lam) * w
        y1, y2 = int(max(cy - half_h, 0)), int(min(cy + half_h, h))
        x1, x2 = int(max(cx - half_w, 0)), int(min(cx + half_w, w))
        mixed = images.clone()
        mixed[..., y1:y2, x1:x2] = images[..., y1:y2, x1:x2].roll(1, 0)
        return mixed, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)

    def _mixup(self, images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
        return images * lam + images.roll(1, 0) * (1.0 - lam), lam


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c targets[c] * log_softmax(logits)[c].

    With smoothed one-hot targets this equals F.cross_entropy(..., label_smoothing=eps).
    """
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
