"""The batched device path against torchvision's per-image functional ops."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from cifar100.config import AugmentConfig
from cifar100.data.batched import (
    AutoAugmentDraws,
    BatchAutoAugment,
    DeviceLoader,
    checked_tables,
    flip,
    random_crop,
)
from cifar100.data.reference import AugmentedDataset, normalize_batch, train_transform
from cifar100.errors import UserError

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
    kw = {"crop_padding": 4, "hflip": 0.5, "vflip": 0.0, "color_jitter": 0.0, "autoaugment": "none"}
    kw.update(aug)
    return DeviceLoader(
        images,
        labels,
        batch,
        AugmentConfig(mean=MEAN, std=STD, **kw),
        seed=3,
        rank=rank,
        world=world,
        device=torch.device("cpu"),
    )


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
            candidates = [TF.crop(src, top, left, 32, 32) for top in range(5) for left in range(5)]
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
    with pytest.raises(UserError, match=r"no batched ColorJitter yet: use data.pipeline=reference"):
        _loader(_images(), torch.arange(64), color_jitter=0.4)


def _edge_images():
    """All-0, all-255, mid-grey, a grey (r = g = b) random image and a 0/255 checkerboard."""
    grey = _images(1, seed=9)[:, :1].expand(1, 3, 32, 32)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)) % 2 * 255).to(torch.uint8).expand(1, 3, 32, 32)
    flat = torch.tensor([0, 255, 128], dtype=torch.uint8)[:, None, None, None].expand(3, 3, 32, 32)
    return torch.cat([flat, grey, checker])


def _torchvision_op(reference, transform_id, magnitude_idx, negative, image):
    """torchvision's own per-sample AutoAugment op at a magnitude bin and sign, on one image."""
    magnitudes_fn, signed = reference._AUGMENTATION_SPACE[transform_id]
    magnitudes = magnitudes_fn(10, *image.shape[-2:])
    magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_idx])
    if signed and negative:
        magnitude = -magnitude
    return reference._apply_image_or_video_transform(
        image, transform_id, magnitude, interpolation=reference.interpolation, fill=reference._fill
    )


def _assert_equals_torchvision(aa, images, draws):
    reference = v2.AutoAugment()  # its ops and magnitudes do not depend on the policy
    out = aa(images, draws)
    for i in range(len(images)):
        want = images[i]
        for slot in (0, 1):
            transform_id, probability, magnitude_idx = aa.policies[int(draws.policy[i])][slot]
            if draws.applies[i, slot] <= probability:
                want = _torchvision_op(reference, transform_id, magnitude_idx, bool(draws.negative[i, slot]), want)
        assert torch.equal(out[i], want), (i, aa.policies[int(draws.policy[i])], draws.negative[i].tolist())


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "svhn"])
@pytest.mark.parametrize("seed", [4, 5, 6])
def test_batched_autoaugment_equals_torchvision_per_image(policy, seed):
    """Each image gets exactly torchvision's ops, at the drawn signs, for its own drawn sub-policy."""
    aa = BatchAutoAugment(policy)
    x = torch.cat([_edge_images(), _images(251, seed=seed)])
    _assert_equals_torchvision(aa, x, aa.draw(len(x), torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("op", list(v2.AutoAugment._AUGMENTATION_SPACE))
def test_each_batched_op_equals_torchvision_at_every_magnitude_and_sign(op, monkeypatch):
    """One batch holds the op at all 10 magnitude bins and both signs, each on random and edge images."""
    # Sub-policy b: `op` at bin b, always; its second op never applies.
    policies = [((op, 1.0, b), ("Invert", 0.0, None)) for b in range(10)]
    monkeypatch.setattr(v2.AutoAugment, "_get_policies", lambda self, policy: policies)
    aa = BatchAutoAugment("cifar10")
    images = torch.cat([_edge_images(), _images(19, seed=7)])
    x = images.repeat(20, 1, 1, 1)
    combo = torch.arange(20).repeat_interleave(len(images))  # every image under every (bin, sign)
    draws = AutoAugmentDraws(
        combo // 2, torch.tensor([0.0, 0.5]).expand(len(x), 2), (combo % 2 == 1)[:, None].expand(len(x), 2)
    )
    _assert_equals_torchvision(aa, x, draws)


def _torchvision_matrix(name, m):
    """The inverse matrix torchvision's F.affine / F.rotate computes for AutoAugment's op on a 32x32 image."""
    shear = math.degrees(math.atan(m))
    corner, centre, still = [-16.0, -16.0], [0.0, 0.0], [0.0, 0.0]  # F.affine's center=[0, 0] is the corner
    center, angle, translate, shears = {
        "ShearX": (corner, 0.0, still, [shear, 0.0]),
        "ShearY": (corner, 0.0, still, [0.0, shear]),
        "TranslateX": (centre, 0.0, [float(int(m)), 0.0], still),
        "TranslateY": (centre, 0.0, [0.0, float(int(m))], still),
        "Rotate": (centre, -(m % 360), still, still),
    }[name]
    return _get_inverse_affine_matrix(center, angle, translate, 1.0, shears)


def test_affine_matrices_equal_torchvision_float32_matrices():
    """The per-image matrices, as float32 (what the device gets), are torchvision's to the bit."""
    aa = BatchAutoAugment("cifar10")
    cases = [
        (name, s * m)
        for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
        for m in aa.space[name][0](10, 32, 32).tolist()
        for s in (1, -1)
    ]
    ops = torch.tensor([aa.ops.index(name) for name, _ in cases])
    got = aa._geometric_matrices(ops, torch.tensor([m for _, m in cases], dtype=torch.float64), 32, 32)
    want = torch.tensor([_torchvision_matrix(name, m) for name, m in cases], dtype=torch.float32)
    assert torch.equal(got.float(), want.view(-1, 2, 3))


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "svhn"])
def test_batched_autoaugment_never_reads_the_device(policy, monkeypatch):
    """Nothing in a batch makes the host wait for an accelerator.

    On the meta device (no data) any read-back raises (.item(), .tolist(), nonzero, mask
    indexing), and torch.tensor(..., device=...), a blocking copy, is refused here.
    """
    real_tensor = torch.tensor

    def host_only(*args, device=None, **kwargs):
        assert device is None or torch.device(device).type == "cpu", "torch.tensor on the device blocks the host"
        return real_tensor(*args, device=device, **kwargs)

    aa = BatchAutoAugment(policy)
    draws = aa.draw(512, torch.Generator().manual_seed(8))
    monkeypatch.setattr(torch, "tensor", host_only)
    out = aa(torch.empty(512, 3, 32, 32, dtype=torch.uint8, device="meta"), draws)
    assert out.shape == (512, 3, 32, 32) and out.dtype == torch.uint8


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


def test_torchvision_autoaugment_tables_are_checked_before_use():
    policies, space = checked_tables(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    assert len(policies) == 25 and "Rotate" in space
    changed = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    changed._policies = [(("Rotate", 0.7), ("Invert", 0.2, None))]  # a slot of another shape
    with pytest.raises(UserError, match=r"AutoAugment's policy tables are not in the form .* data.pipeline=reference"):
        checked_tables(changed)
    renamed = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    renamed._AUGMENTATION_SPACE = {k.lower(): v for k, v in renamed._AUGMENTATION_SPACE.items()}
    with pytest.raises(UserError, match=r"torchvision .*: AutoAugment's policy tables"):
        checked_tables(renamed)


def test_alternating_flip_mirrors_each_image_every_other_epoch_the_same_in_both_pipelines():
    """augment.hflip=alternating: an image mirrored in one epoch is not in the next and is again in the
    one after; which ones start mirrored is a seeded half; the per-sample path (indexed by the same
    image numbers) mirrors the same images in the same epochs."""
    n = 200
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :, 0] = 255  # a bright left column shows whether the image was flipped
    aug = AugmentConfig(mean=MEAN, std=STD, crop_padding=0, hflip="alternating")
    dataset = AugmentedDataset(x, torch.arange(n), train_transform(aug), seed=3, alternate_flips=True)

    def device_flips(epoch):
        loader = _loader(x, torch.arange(n), batch=50, crop_padding=0, hflip="alternating")
        loader.set_epoch(epoch)
        flips = torch.zeros(n, dtype=torch.bool)
        for images, labels in loader:
            flips[labels] = images[:, 0, 0, -1] > images[:, 0, 0, 0]
        return flips

    def sample_flips(epoch):
        dataset.set_epoch(epoch)
        return torch.tensor([bool(dataset[i][0][0, 0, -1] > dataset[i][0][0, 0, 0]) for i in range(n)])

    first, second, third = (device_flips(e) for e in (1, 2, 3))
    assert torch.equal(second, ~first) and torch.equal(third, first)
    assert 0.35 < first.float().mean() < 0.65
    assert torch.equal(sample_flips(1), first) and torch.equal(sample_flips(2), second)
    assert torch.equal(device_flips(1), first)  # the same again: nothing but seed, epoch and image decides
