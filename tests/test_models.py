"""timm models with the CIFAR stem, the activation override and our registered cifarnet family."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cifar100.config import AugmentConfig, ModelConfig
from cifar100.data.cifar import load
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError
from cifar100.training.models import ACTIVATIONS, build_model, count_parameters, flops_per_image, whiten_stem


def test_cifar_stem_replaces_the_imagenet_stem():
    model = build_model(ModelConfig(name="resnet50", act=None, cifar_stem=True), 100)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    # The first stage sees the full 32x32 image.
    feats = model.forward_features(torch.zeros(1, 3, 32, 32))
    assert feats.shape[-2:] == (4, 4)
    imagenet = build_model(ModelConfig(name="resnet50", act=None, cifar_stem=False), 100).eval()
    assert imagenet.conv1.stride == (2, 2) and imagenet.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 1


def test_mish_replaces_every_relu_including_se_blocks():
    before = timm.create_model("seresnet50", num_classes=100)
    relus = sum(isinstance(m, nn.ReLU) for m in before.modules())
    assert relus > 0
    model = build_model(ModelConfig(name="seresnet50", act="mish", cifar_stem=True), 100)
    kinds = {type(m) for m in model.modules() if isinstance(m, ACTIVATIONS)}
    assert kinds == {nn.Mish}
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)


def test_flops_and_parameters_of_seresnet50_match_the_issue():
    model = build_model(ModelConfig(name="seresnet50", act="mish", cifar_stem=True), 100)
    assert count_parameters(model) == pytest.approx(26.24e6, rel=0.01)
    assert flops_per_image(model) == pytest.approx(2.6e9, rel=0.01)  # "2.6 GFLOP per 32x32 image forward"


@pytest.mark.parametrize("name", ["cifarnet_tiny", "cifarnet_s", "cifarnet_m", "cifarnet_l", "cifarnet_fast"])
def test_cifarnet_family_is_in_timms_registry(name):
    assert timm.is_model(name)
    model = build_model(ModelConfig(name=name, act=None, cifar_stem=True), 100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_act_override_on_cifarnet_and_unknown_names():
    model = build_model(ModelConfig(name="cifarnet_s", act="relu", cifar_stem=True), 100)
    assert {type(m) for m in model.modules() if isinstance(m, ACTIVATIONS)} == {nn.ReLU}
    with pytest.raises(UserError, match="unknown activation 'mush'"):
        build_model(ModelConfig(name="cifarnet_s", act="mush", cifar_stem=True), 100)
    with pytest.raises(UserError, match="unknown model 'resnet5O'"):
        build_model(ModelConfig(name="resnet5O", act=None, cifar_stem=True), 100)
    with pytest.raises(UserError, match=r"model.cifar_stem=false"):
        build_model(ModelConfig(name="vit_tiny_patch16_224", act=None, cifar_stem=True), 100)


def test_weights_are_never_downloaded():
    with pytest.raises(UserError, match="no pretrained weights"):
        timm.create_model("cifarnet_s", pretrained=True)


def test_whitened_stem_decorrelates_real_patches_and_stays_fixed(real_data):
    aug = AugmentConfig()
    images = load(real_data, False).train.images
    fit, held = (normalize_batch(images[s], aug.mean, aug.std) for s in (slice(0, 5000), slice(5000, 7000)))
    model = build_model(ModelConfig(name="cifarnet_s", whiten=True), 100)
    whiten_stem(model, fit)
    weight = model.stem[0].weight
    assert weight.shape == (24, 3, 2, 2) and not weight.requires_grad and model.stem[0].bias.requires_grad
    assert torch.equal(weight[12:], -weight[:12])  # each filter twice, once negated
    # On images it was not fitted on, the 12 filters' outputs are uncorrelated; the patches' strong
    # directions come out with unit variance, the weakest are damped by eps.
    out = F.conv2d(held, weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    moments = out.T @ out / len(out)
    assert (moments - torch.diag(moments.diagonal())).abs().max() < 0.05
    assert moments.diagonal()[6:].sub(1).abs().max() < 0.1 and (moments.diagonal() > 0.5).all()
    assert (
        count_parameters(model) == count_parameters(build_model(ModelConfig(name="cifarnet_s"), 100)) - 24 * 3 * 2 * 2
    )  # trainable ones


def test_whitening_needs_a_patch_stem():
    with pytest.raises(UserError, match="needs a cifarnet model"):
        build_model(ModelConfig(name="resnet18", whiten=True), 100)
    with pytest.raises(UserError, match="whitening 12-value patches needs 24"):
        whiten_stem(build_model(ModelConfig(name="cifarnet_tiny"), 100), torch.zeros(4, 3, 32, 32))


def test_cifarnet_fast_is_the_speedruns_shape_and_takes_every_training_size():
    model = build_model(ModelConfig(name="cifarnet_fast", act=None), 100)
    assert [b.conv2.out_channels for b in model.blocks] == [64, 256, 768]
    assert count_parameters(model) == pytest.approx(7.95e6, rel=0.01)
    assert flops_per_image(model) == pytest.approx(0.437e9, rel=0.01)
    for size in (16, 20, 24, 32):  # data.sizes' smallest and the speedrun's phases
        assert model(torch.randn(2, 3, size, size)).shape == (2, 100)


def test_dirac_init_makes_each_conv_that_can_pass_its_input_the_identity_on_it():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cifarnet_s", act=None, init="dirac"), 100)
    x = torch.randn(1, 128, 9, 9)
    for block in model.blocks:  # conv1 widens (24->32, ...), conv2 keeps the width: both set
        for conv in (block.conv1, block.conv2):
            out = F.conv2d(x[:, : conv.in_channels], conv.weight)
            assert torch.equal(out[:, : conv.in_channels], x[:, : conv.in_channels, 1:-1, 1:-1])
            if conv.out_channels > conv.in_channels:  # the other filters keep their random start
                assert conv.weight[conv.in_channels :].abs().sum() > 0
    stem = build_model(ModelConfig(name="cifarnet_s", act=None, init="default"), 100).stem[0]
    assert stem.kernel_size == (2, 2) and model.stem[0].weight.abs().sum() > 0  # a 2x2 patch conv: left alone
    resnet = build_model(ModelConfig(name="resnet18", init="dirac"), 100)
    assert torch.equal(resnet.layer1[0].conv1.weight[:, :, 1, 1], torch.eye(64))  # any timm model's convs
