"""The batched device path against torchvision's per-image functional ops."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cifar100.device_data import BatchAutoAugment, DeviceLoader, flip, random_crop
from cifar100.errors import UserError
from cifar100.transforms import normalize_batch

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _images(n=64, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_random_crop_matches_torchvision_pad_then_crop_per_image():
    x = _images()
    top, left = torch.randint(0, 9, (64,)), torch.randint(0, 9, (64,))
    out = random_crop(x, 4, top, left)
    for i in range(64):
        want = TF.crop(TF.pad(x[i], [4]), int(top[i]), int(left[i]), 32, 32)
        assert torch.equal(out[i], want)


def test_flips_match_torchvision_where_masked():
    x = _images()
    mask = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    h, v = flip(x, mask, 3), flip(x, mask, 2)
    for i in range(64):
        assert torch.equal(h[i], TF.horizontal_flip(x[i]) if mask[i] else x[i])
        assert torch.equal(v[i], TF.vertical_flip(x[i]) if mask[i] else x[i])


def _loader(images, labels, *, world=1, rank=0, batch=16, **aug):
    kw = dict(crop_padding=4, hflip=0.5, vflip=0.0, color_jitter=0.0, autoaugment="none")
    kw.update(aug)
    return DeviceLoader(images, labels, batch, mean=MEAN, std=STD, seed=3, rank=rank, world=world,
                        device=torch.device("cpu"), **kw)


def test_loader_with_autoaugment_yields_normalized_batches():
    x, y = _images(64), torch.arange(64)
    loader = _loader(x, y, autoaugment="cifar10")
    loader.set_epoch(2)
    batches = list(loader)
    assert len(batches) == 4 and all(images.dtype == torch.float32 for images, _ in batches)
    loader.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader))


def test_each_batch_is_a_crop_and_flip_of_its_source_images():
    x, y = _images(64), torch.arange(64)
    loader = _loader(x, y, crop_padding=2, hflip=0.5)
    loader.set_epoch(1)
    for images, labels in loader:
        for img, label in zip(images, labels):
            src = TF.pad(x[label], [2])
            candidates = [TF.crop(src, t, l, 32, 32) for t in range(5) for l in range(5)]
            candidates += [TF.horizontal_flip(c) for c in candidates]
            norm = normalize_batch(torch.stack(candidates), MEAN, STD)
            assert any(torch.equal(img, c) for c in norm)


def test_every_image_once_per_epoch_split_across_ranks_and_reproducible():
    x, y = _images(96), torch.arange(96)
    seen = []
    for rank in range(2):
        loader = _loader(x, y, world=2, rank=rank)
        loader.set_epoch(5)
        seen.append(torch.cat([labels for _, labels in loader]))
    assert len(seen[0]) == len(seen[1]) == 48
    assert sorted(torch.cat(seen).tolist()) == list(range(96))
    again = _loader(x, y, world=2, rank=0)
    again.set_epoch(5)
    first = [images for images, _ in again]
    again.set_epoch(5)
    assert all(torch.equal(a, b) for a, b in zip(first, [images for images, _ in again]))
    again.set_epoch(6)
    assert not torch.equal(first[0], next(iter(again))[0])


def test_flip_frequency_follows_its_probability():
    x = torch.zeros(4000, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :, 0] = 255  # a bright left column shows whether the image was flipped
    loader = _loader(x, torch.zeros(4000, dtype=torch.long), batch=500, crop_padding=0, hflip=0.3)
    loader.set_epoch(0)
    flipped = sum(int((images[:, 0, 0, -1] > images[:, 0, 0, 0]).sum()) for images, _ in loader)
    assert abs(flipped / 4000 - 0.3) < 5 * (0.3 * 0.7 / 4000) ** 0.5


def test_operations_without_a_batched_version_are_refused():
    with pytest.raises(UserError, match="no batched ColorJitter yet: use data.pipeline=reference"):
        _loader(_images(), torch.arange(64), color_jitter=0.4)


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "svhn"])
def test_batched_autoaugment_equals_torchvision_per_image(policy):
    """Each image gets exactly torchvision's op, at the drawn sign, for its own drawn sub-policy."""
    aa = BatchAutoAugment(policy)
    x = _images(256, seed=4)
    draws = aa.draw(256, torch.Generator().manual_seed(5))
    out = aa(x, draws)
    for i in range(256):
        want = x[i : i + 1]
        for slot in (0, 1):
            transform_id, probability, magnitude_idx = aa.policies[int(draws.policy[i])][slot]
            if draws.applies[i, slot] <= probability:
                want = aa.op(transform_id, magnitude_idx, bool(draws.negative[i, slot]), want, (32, 32))
        assert torch.equal(out[i], want[0]), (i, aa.policies[int(draws.policy[i])])


def test_autoaugment_draw_frequencies_follow_the_policy():
    aa = BatchAutoAugment("cifar10")
    n = 50_000
    draws = aa.draw(n, torch.Generator().manual_seed(6))
    counts = torch.bincount(draws.policy, minlength=len(aa.policies)).double()
    expected = n / len(aa.policies)
    assert ((counts - expected).abs() < 5 * expected**0.5).all()  # each sub-policy as often
    for index, policy in enumerate(aa.policies):
        mine = draws.applies[draws.policy == index]
        for slot in (0, 1):
            p = policy[slot][1]
            rate = (mine[:, slot] <= p).double().mean().item()
            assert abs(rate - p) < 5 * (p * (1 - p) / len(mine)) ** 0.5 + 1e-9
    assert abs(draws.negative.double().mean().item() - 0.5) < 0.01
