import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar100.data.mixing import BatchMixer, soft_target_cross_entropy
from cifar100.errors import UserError

B, C = 8, 10


def constant_images(batch=B, size=32):
    """Image k is filled with the value k, so every output pixel names its source image."""
    return torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, size, size).clone()


def mixer(cutmix_prob=0.0, mixup_prob=0.0, label_smoothing=0.0, alpha=1.0):
    return BatchMixer(C, cutmix_prob, alpha, mixup_prob, alpha, label_smoothing)


def test_cutmix_target_weight_equals_kept_area():
    images, labels = constant_images(), torch.arange(B)
    before = images.clone()
    rng = np.random.default_rng(0)
    kept_fractions = []
    for _ in range(100):
        out, targets = mixer(cutmix_prob=1.0)(images, labels, rng)
        assert torch.equal(images, before)  # input untouched
        assert targets.dtype == torch.float32 and targets.shape == (B, C)
        torch.testing.assert_close(targets.sum(1), torch.ones(B))
        for k in range(B):
            partner = (k - 1) % B
            own = (out[k] == k).double().mean().item()
            from_partner = (out[k] == partner).double().mean().item()
            assert own + from_partner == 1.0  # every pixel is from image k or its partner k-1
            assert targets[k, k].item() == pytest.approx(own, abs=1e-6)
            assert targets[k, partner].item() == pytest.approx(from_partner, abs=1e-6)
            assert targets[k].sum().item() == pytest.approx(1.0, abs=1e-6)
        # one box for the whole batch
        assert len({round(targets[k, k].item(), 6) for k in range(B)}) == 1
        kept_fractions.append(targets[0, 0].item())
    # Beta(1, 1) boxes: a spread of sizes, including clipped ones (kept area > nominal)
    assert min(kept_fractions) < 0.2 and max(kept_fractions) > 0.9
    assert 0.5 < np.mean(kept_fractions) < 0.8


def test_cutmix_box_is_a_rectangle_pasted_from_the_partner():
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out, targets = mixer(cutmix_prob=1.0)(images, torch.arange(4), np.random.default_rng(3))
    pasted = (out != images).any(0).any(0)  # (H, W) mask of replaced pixels
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    y1, y2, x1, x2 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert pasted[y1:y2, x1:x2].all() and pasted.sum() == (y2 - y1) * (x2 - x1)
    assert torch.equal(out[..., y1:y2, x1:x2], images.roll(1, 0)[..., y1:y2, x1:x2])
    assert targets[0, 0].item() == pytest.approx(1 - pasted.sum().item() / 256, abs=1e-6)


def test_mixup_pixels_are_convex_combination_with_target_lambda():
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(B)
    before = images.clone()
    rng = np.random.default_rng(1)
    for _ in range(20):
        out, targets = mixer(mixup_prob=1.0)(images, labels, rng)
        assert torch.equal(images, before)
        lam = targets[0, 0].item()
        assert 0.0 < lam < 1.0
        torch.testing.assert_close(targets.diagonal(), torch.full((B,), lam))
        torch.testing.assert_close(targets.sum(1), torch.ones(B))
        torch.testing.assert_close(out, lam * images + (1 - lam) * images.roll(1, 0))


def test_label_smoothing_applied_before_mixing():
    eps = 0.1
    out, targets = mixer(mixup_prob=1.0, label_smoothing=eps)(
        constant_images(), torch.arange(B), np.random.default_rng(2)
    )
    lam = out[1, 0, 0, 0].item()  # image 1 = lam * 1 + (1 - lam) * 0
    smooth = F.one_hot(torch.arange(B), C).float() * (1 - eps) + eps / C
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.roll(1, 0))
    torch.testing.assert_close(targets.sum(1), torch.ones(B))


def classify(images, out):
    """'none' if untouched, 'cutmix' if every pixel is a source value, else 'mixup'."""
    if torch.equal(out, images):
        return "none"
    return "cutmix" if torch.equal(out, out.round()) else "mixup"


def test_mode_frequencies_match_probabilities():
    m = BatchMixer(C, cutmix_prob=0.3, cutmix_alpha=1.0, mixup_prob=0.2, mixup_alpha=0.4, label_smoothing=0.0)
    images, labels = constant_images(2, 32), torch.arange(2)
    rng = np.random.default_rng(4)
    n = 2000
    counts = {"cutmix": 0, "mixup": 0, "none": 0}
    for _ in range(n):
        counts[classify(images, m(images, labels, rng)[0])] += 1
    for mode, p in (("cutmix", 0.3), ("mixup", 0.2), ("none", 0.5)):
        # 5 sigma; a CutMix box truncated to nothing counts as 'none' (rare, well inside it)
        assert abs(counts[mode] - n * p) < 5 * math.sqrt(n * p * (1 - p)), counts


def test_no_mixing_targets_are_smoothed_one_hot_and_images_unchanged():
    images = torch.randn(B, 3, 32, 32)
    out, targets = mixer(label_smoothing=0.2)(images, torch.arange(B) % C, np.random.default_rng(0))
    assert torch.equal(out, images)
    expected = torch.full((B, C), 0.02).scatter_(1, torch.arange(B)[:, None] % C, 0.82)
    torch.testing.assert_close(targets, expected)


def test_same_rng_seed_same_result():
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(6))
    m = BatchMixer(C, 0.5, 1.0, 0.5, 0.2, 0.1)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [m(images, labels, rng) for _ in range(10)]

    torch.manual_seed(1)
    first = run(11)
    torch.manual_seed(2)  # the global torch RNG plays no part
    for (a, ta), (b, tb) in zip(first, run(11)):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, run(12)))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_soft_target_ce_equals_cross_entropy_with_label_smoothing(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, generator=g) * 3
    labels = torch.randint(0, C, (B,), generator=g)
    _, targets = mixer(label_smoothing=eps)(torch.zeros(B, 3, 32, 32), labels, np.random.default_rng(0))
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, targets), F.cross_entropy(logits, labels, label_smoothing=eps)
    )


@pytest.mark.parametrize(
    "args",
    [
        dict(cutmix_prob=-0.1),
        dict(cutmix_prob=1.1),
        dict(mixup_prob=1.5),
        dict(cutmix_prob=0.6, mixup_prob=0.5),
        dict(cutmix_prob=0.5, cutmix_alpha=0.0),
        dict(mixup_prob=0.5, mixup_alpha=-1.0),
        dict(label_smoothing=1.5),
        dict(num_classes=0),
    ],
)
def test_invalid_settings_raise_user_error(args):
    base = dict(num_classes=C, cutmix_prob=0.0, cutmix_alpha=1.0, mixup_prob=0.0, mixup_alpha=1.0, label_smoothing=0.0)
    with pytest.raises(UserError):
        BatchMixer(**{**base, **args})


def test_alpha_may_be_zero_when_its_mode_is_off():
    BatchMixer(C, cutmix_prob=0.0, cutmix_alpha=0.0, mixup_prob=1.0, mixup_alpha=0.2, label_smoothing=0.0)
