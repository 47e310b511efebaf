import math

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from cifar100.config import AugmentConfig
from cifar100.data.reference import (
    AUTOAUGMENT_POLICIES,
    AugmentedDataset,
    eval_transform,
    normalize_batch,
    train_transform,
)
from cifar100.errors import UserError

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Identity normalization: outputs are x / 255, so they can be compared with raw crops.
ID_MEAN, ID_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _transform(crop_padding, hflip, vflip, color_jitter, autoaugment, mean, std):
    return train_transform(
        AugmentConfig(
            crop_padding=crop_padding,
            hflip=hflip,
            vflip=vflip,
            color_jitter=color_jitter,
            autoaugment=autoaugment,
            mean=mean,
            std=std,
        )
    )


def random_images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def dataset(transform, n=16, seed=7):
    return AugmentedDataset(random_images(n), torch.arange(n) % 100, transform, seed=seed)


def as_float(x):
    return TF.to_dtype(x, torch.float32, scale=True)


def all_outputs(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_crop_and_hflip_equal_functional_pad_crop_flip():
    ds = dataset(_transform(4, 1.0, 0.0, 0.0, "none", ID_MEAN, ID_STD))
    offsets = set()
    for i in range(len(ds)):
        out, label = ds[i]
        assert label == i and out.dtype == torch.float32 and out.shape == (3, 32, 32)
        padded = TF.pad(ds.images[i], [4])
        matches = [
            (top, left)
            for top in range(9)
            for left in range(9)
            if torch.equal(out, as_float(TF.horizontal_flip(TF.crop(padded, top, left, 32, 32))))
        ]
        assert len(matches) == 1  # random pixels: exactly one of the 81 flipped crops fits
        offsets.add(matches[0])
    assert len(offsets) > 4  # the offsets are really drawn, not fixed


@pytest.mark.parametrize("flip_arg, flip_fn", [(1, TF.horizontal_flip), (2, TF.vertical_flip)])
def test_flip_probability_zero_never_one_always(flip_arg, flip_fn):
    def flips(p):
        args = [0, 0.0, 0.0, 0.0, "none", ID_MEAN, ID_STD]
        args[flip_arg] = p
        return _transform(*args)

    never, always = dataset(flips(0.0)), dataset(flips(1.0))
    for epoch in range(3):
        never.set_epoch(epoch)
        always.set_epoch(epoch)
        assert torch.equal(all_outputs(never), as_float(never.images))
        assert torch.equal(all_outputs(always), as_float(flip_fn(always.images)))


def test_hflip_half_frequency_within_binomial_bounds():
    ds = dataset(_transform(0, 0.5, 0.0, 0.0, "none", ID_MEAN, ID_STD))
    plain, flipped = as_float(ds.images), as_float(TF.horizontal_flip(ds.images))
    n_flipped, n = 0, 0
    for epoch in range(125):  # 125 epochs x 16 images = 2000 draws
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            out = ds[i][0]
            is_flipped = torch.equal(out, flipped[i])
            assert is_flipped or torch.equal(out, plain[i])
            n_flipped += is_flipped
            n += 1
    assert abs(n_flipped - n / 2) < 5 * math.sqrt(n / 4)  # 5 sigma: +-112 around 1000


def test_normalization_exact_for_known_pixel():
    image = torch.empty(1, 3, 32, 32, dtype=torch.uint8)
    image[:, 0], image[:, 1], image[:, 2] = 0, 128, 255
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((0, 128, 255), MEAN, STD)])
    out = eval_transform(MEAN, STD)(image[0])
    torch.testing.assert_close(out[:, 5, 7], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 32, 32), rtol=1e-6, atol=1e-6)


def test_normalize_batch_matches_per_sample_paths_bitwise():
    images = random_images()
    batch = normalize_batch(images, MEAN, STD)
    assert batch.dtype == torch.float32 and batch.shape == images.shape
    per_sample_eval = torch.stack([eval_transform(MEAN, STD)(x) for x in images])
    no_aug_train = all_outputs(dataset(_transform(0, 0.0, 0.0, 0.0, "none", MEAN, STD)))
    assert torch.equal(batch, per_sample_eval)
    assert torch.equal(batch, no_aug_train)
    assert images.dtype == torch.uint8  # input untouched


def full_pipeline():
    return _transform(4, 0.5, 0.5, 0.4, "cifar10", MEAN, STD)


def test_same_seed_epoch_index_identical_across_calls_and_global_state():
    ds = dataset(full_pipeline())
    ds.set_epoch(3)
    torch.manual_seed(123)
    first = all_outputs(ds)
    torch.manual_seed(999)  # a different global state must not matter
    torch.rand(17)
    assert torch.equal(all_outputs(ds), first)
    fresh = dataset(full_pipeline())  # a new object (as in another worker) with the same seed
    fresh.set_epoch(3)
    assert torch.equal(all_outputs(fresh), first)


def test_different_epoch_or_seed_changes_augmentation():
    ds = dataset(_transform(4, 0.5, 0.0, 0.0, "none", MEAN, STD))
    epoch0 = all_outputs(ds)
    ds.set_epoch(1)
    epoch1 = all_outputs(ds)
    other_seed = all_outputs(dataset(_transform(4, 0.5, 0.0, 0.0, "none", MEAN, STD), seed=8))
    # 162 crop/flip outcomes per image: a handful of coincidences at most
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1)) >= 12
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, other_seed)) >= 12


def test_getitem_leaves_global_rng_untouched():
    ds = dataset(full_pipeline())
    torch.manual_seed(5)
    state = torch.get_rng_state()
    ds[3]
    assert torch.equal(torch.get_rng_state(), state)


def test_dataloader_independent_of_workers_and_assignment():
    ds = dataset(full_pipeline())
    ds.set_epoch(2)
    expected = all_outputs(ds)
    # Different worker counts and batch sizes route each sample to a different worker.
    for num_workers, batch_size in ((0, 4), (2, 3), (2, 5)):
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
        images = torch.cat([x for x, _ in loader])
        labels = torch.cat([y for _, y in loader])
        assert torch.equal(images, expected), (num_workers, batch_size)
        assert torch.equal(labels, torch.arange(16))


def test_set_epoch_reaches_persistent_workers():
    ds = dataset(full_pipeline())
    expected = {}
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        expected[epoch] = all_outputs(ds)
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    for epoch in (1, 2, 1):  # the same worker processes serve every epoch
        ds.set_epoch(epoch)
        assert torch.equal(torch.cat([x for x, _ in loader]), expected[epoch]), epoch


@pytest.mark.parametrize("policy", sorted(AUTOAUGMENT_POLICIES))
def test_each_autoaugment_policy_runs(policy):
    ds = dataset(_transform(0, 0.0, 0.0, 0.0, policy, MEAN, STD))
    out = all_outputs(ds)
    assert out.dtype == torch.float32 and out.shape == (16, 3, 32, 32)
    assert torch.isfinite(out).all()
    changed = (out != normalize_batch(ds.images, MEAN, STD)).flatten(1).any(1)
    if policy == "none":
        assert not changed.any()
    else:
        assert changed.any()


def test_color_jitter_changes_colours_only_within_range():
    ds = dataset(_transform(0, 0.0, 0.0, 0.4, "none", ID_MEAN, ID_STD))
    out = all_outputs(ds)
    assert not torch.equal(out, as_float(ds.images))
    assert out.min() >= 0 and out.max() <= 1


def test_unknown_autoaugment_policy_raises_user_error_listing_valid_names():
    with pytest.raises(UserError) as info:
        _transform(4, 0.5, 0.0, 0.0, "randaugment", MEAN, STD)
    for name in ("none", "cifar10", "imagenet", "svhn"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [dict(crop_padding=-1), dict(hflip=1.5), dict(vflip=-0.1), dict(color_jitter=-0.2)],
)
def test_invalid_parameters_raise_user_error(kwargs):
    args = dict(crop_padding=4, hflip=0.5, vflip=0.0, color_jitter=0.0, autoaugment="none", mean=MEAN, std=STD)
    with pytest.raises(UserError):
        _transform(**{**args, **kwargs})
