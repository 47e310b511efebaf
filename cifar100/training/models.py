"""Models through timm: any timm name, a CIFAR stem, an activation override, and our own small nets.

timm builds ImageNet models (7x7 stride-2 stem and a max-pool, which throw away most of a
32x32 image); `cifar_stem` swaps that stem for a 3x3 stride-1 conv. `act` replaces every
activation module, including the ones timm hard-codes (the ReLU inside SE blocks).
The `cifarnet_*` family is registered in timm's registry so recipes name it like any other.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from timm.models import register_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifar100.config import Config, ModelConfig
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError, clip, shown

# Module types treated as "an activation" by the override.
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.Softplus,
)


def build_model(cfg: ModelConfig, num_classes: int, device: str | None = None) -> nn.Module:
    """A freshly initialised timm model for 32x32 inputs from the `model` section; weights are never downloaded.

    A model that cannot take 32x32 images (a ViT, Swin, DeiT, LeViT or Mixer made for 224x224, a
    network that shrinks 32 pixels to nothing) is refused with the reason, found by one dry forward.
    `device="meta"` builds it without memory or initialisation, to check a config in a second.
    """
    name = cfg.name
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; `timm.list_models()` lists them"
        raise UserError(f"unknown model {shown(name)}{hint}")
    if cfg.whiten and not name.startswith("cifarnet"):
        raise UserError(f"model.whiten=true needs a cifarnet model (a 2x2 patch stem), not {name!r}")
    with torch.device(device) if device else contextlib.nullcontext():
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=cfg.drop_rate)
        if cfg.cifar_stem and not name.startswith("cifarnet"):
            _cifar_stem(model, name)
        if cfg.act:
            replace_activations(model, cfg.act)
        if cfg.init == "dirac":
            dirac_init(model)
        _check_input_size(model, name, num_classes)
    return model


def dirac_init(model: nn.Module) -> int:
    """Start every conv that can pass its input through unchanged as the identity (airbench's init):
    an ungrouped conv with an odd square kernel and at least as many filters as input channels gets
    its first in-channels filters set by `torch.nn.init.dirac_`; its other filters, and every other
    conv (a patch stem, a 1x1 that narrows, a depthwise one), keep the model's initialisation.
    Returns how many convs it set."""
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            continue
        kh, kw = module.kernel_size
        if kh != kw or kh % 2 == 0 or module.out_channels < module.in_channels:
            continue
        with torch.no_grad():
            nn.init.dirac_(module.weight[: module.in_channels])
        count += 1
    return count


def _check_input_size(model: nn.Module, name: str, num_classes: int) -> None:
    """One forward of a 32x32 image: what a model made for another size fails at, with timm's reason."""
    was_training = model.training
    model.eval()
    image = torch.zeros(1, 3, 32, 32)
    try:
        with torch.no_grad():
            out = model(image)
        problem = None if tuple(out.shape) == (1, num_classes) else f"it gives outputs of shape {tuple(out.shape)}"
    except Exception as err:  # whatever the architecture raises on a size it cannot take
        if image.is_meta and (isinstance(err, NotImplementedError) or "meta" in str(err)):
            return  # an operation without a meta kernel: the real build checks again
        problem = f"{type(err).__name__}: {clip(str(err).splitlines()[0] if str(err) else '')}"
    finally:
        model.train(was_training)
    if problem:
        pretrained = cast(dict[str, Any], getattr(model, "pretrained_cfg", {}))  # timm models carry one
        size = pretrained.get("input_size", (3, 0, 0))
        made = f", made for {size[1]}x{size[2]} images" if pretrained.get("fixed_input_size") else ""
        raise UserError(
            f"model.name={name}{made}, cannot take CIFAR's 32x32 images ({problem}); choose a model without "
            "a fixed input size: ResNets, ConvNeXt, EfficientNets, RegNets, cifarnet_* (docs/configuration.md, Models)"
        )


def whiten_stem(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Make a cifarnet's patch stem whiten the patches of `images` (normalised, N x C x H x W) and freeze it.

    Each of the C*k*k eigenvectors of the patches' second-moment matrix, scaled by 1/sqrt(eigenvalue),
    becomes a filter, once as is and once negated (as airbench starts its first layer): the stem's
    outputs then start uncorrelated with unit variance, and a short schedule need not learn that.
    The filters stay fixed; the bias trains.
    """
    conv = cast(nn.Conv2d, model.get_submodule("stem.0"))  # a cifarnet's patch conv (its first_conv)
    dim = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if conv.out_channels != 2 * dim:
        raise UserError(
            f"model.whiten: the stem has {conv.out_channels} filters; whitening {dim}-value patches needs {2 * dim}"
        )
    moments = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for chunk in images.split(256):
        patches = F.unfold(chunk.float(), conv.kernel_size).transpose(1, 2).reshape(-1, dim).double()
        moments += patches.T @ patches
        count += patches.shape[0]
    values, vectors = torch.linalg.eigh(moments / count)
    filters = (vectors / (values + eps).sqrt()).T.reshape(dim, *conv.weight.shape[1:])
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.weight.requires_grad_(False)


def replace_activations(model: nn.Module, act: str) -> int:
    """Swap every activation module for `act` (a timm activation name); returns how many."""
    try:
        layer = get_act_layer(act)
    except Exception:
        layer = None
    if layer is None or not isinstance(layer, type):
        raise UserError(f"unknown activation {act!r}: try relu, mish, silu, gelu, leaky_relu, elu, hard_swish")
    count = 0
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, ACTIVATIONS) or type(child).__module__.startswith("timm.layers.activations"):
                setattr(parent, child_name, layer())
                count += 1
    return count


def _cifar_stem(model: nn.Module, name: str) -> None:
    """3x3 stride-1 first conv, no max-pool: the usual ResNet adaptation to 32x32 images."""
    first = cast(dict[str, Any], model.pretrained_cfg).get("first_conv", "")  # timm sets it on its models
    conv = model.get_submodule(first) if first else None
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError(
            f"model.cifar_stem is supported for ResNet-style timm models; {name} has another stem: "
            "set model.cifar_stem=false"
        )
    stem = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    parent_name, _, attr = first.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, stem)
    model.maxpool = nn.Identity()


def flops_per_image(model: nn.Module, image_size: int = 32) -> int:
    """Forward FLOPs for one image (multiply-add = 2), counted by PyTorch's FLOP counter."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def recipe_flops(cfg: Config) -> tuple[int, float]:
    """A recipe's forward FLOPs per 32-px image, and its training FLOPs: forward and backward taken as
    3x forward, over `train.epochs` of its training images (each `data.sizes` phase at its own size).
    Counted on a model built on the meta device: no memory, no initialisation."""
    model = build_model(cfg.model, 100, device="meta")
    per_image = flops_per_image(model)
    phases = cfg.data.sizes or ((32.0, 1.0),)
    average = sum(fraction * flops_per_image(model, int(size)) for size, fraction in phases)
    images = (cfg.data.train_limit or 50_000 - cfg.data.val_size) * cfg.train.epochs
    return per_image, 3 * average * images


WHITEN_IMAGES = 5000  # training images whose patches set a whitened stem (model.whiten): airbench's count


def model_for_run(
    cfg: Config, num_classes: int, train_images: torch.Tensor, device: torch.device
) -> tuple[nn.Module, int, int]:
    """The run's model on `device`, in its memory format, its stem whitened from `train_images` where
    model.whiten asks (the same images on every process; a resume then loads the trained weights); with
    its trainable parameters and forward FLOPs per image."""
    model = build_model(cfg.model, num_classes)
    if cfg.model.whiten:
        whiten_stem(model, normalize_batch(train_images[:WHITEN_IMAGES], cfg.augment.mean, cfg.augment.std))
    parameter_count, flops = count_parameters(model), flops_per_image(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device), parameter_count, flops


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _ConvBlock(nn.Module):
    """conv -> (pool) -> BN -> act, twice: the airbench/ResNet-9 layer shape, cheap on 32x32; `residual`
    adds the first half's output to the second's (a ResNet-9 residual, which lets a deep stage train fast)."""

    def __init__(self, cin: int, cout: int, act_layer: type[nn.Module], residual: bool = False):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        out = self.act2(self.bn2(self.conv2(x)))
        return x + out if self.residual else out


class CifarNet(nn.Module):
    """A small fast CIFAR network: 2x2 patch stem, three conv blocks that halve the size, max-pool head.
    It takes any input size from 8 px (progressive resizing trains it smaller than 32)."""

    pretrained_cfg: dict[str, Any]  # set by _cifarnet, as timm sets it on the models it creates

    def __init__(
        self,
        widths: tuple[int, int, int],
        num_classes: int = 100,
        in_chans: int = 3,
        stem_width: int = 24,
        act_layer: str | type[nn.Module] = "gelu",
        drop_rate: float = 0.0,
        residual: bool = False,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        act = get_act_layer(act_layer)
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, bias=True), act())
        chans = (stem_width, *widths)
        self.blocks = nn.Sequential(*[_ConvBlock(chans[i], chans[i + 1], act, residual) for i in range(3)])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(widths[-1], num_classes)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x))).flatten(1)
        logits = self.head(self.drop(x))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits


def _cifarnet(widths: tuple[int, int, int], stem_width: int, **kwargs) -> CifarNet:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype"):
        kwargs.pop(key, None)
    if kwargs.pop("pretrained", False):
        raise UserError("cifarnet models have no pretrained weights")
    model = CifarNet(widths, stem_width=stem_width, **kwargs)
    model.pretrained_cfg = {"first_conv": "stem.0", "classifier": "head", "input_size": (3, 32, 32)}
    return model


@register_model
def cifarnet_tiny(pretrained: bool = False, **kwargs) -> CifarNet:
    """A few thousand parameters: for tests and the smoke recipe."""
    return _cifarnet((16, 32, 32), stem_width=8, pretrained=pretrained, **kwargs)


@register_model
def cifarnet_s(pretrained: bool = False, **kwargs) -> CifarNet:
    """The `cpu` recipe's model: 0.31 M parameters at 100 classes."""
    return _cifarnet((32, 64, 128), stem_width=24, pretrained=pretrained, **kwargs)


@register_model
def cifarnet_m(pretrained: bool = False, **kwargs) -> CifarNet:
    """Twice the width of cifarnet_s."""
    return _cifarnet((64, 128, 256), stem_width=24, pretrained=pretrained, **kwargs)


@register_model
def cifarnet_l(pretrained: bool = False, **kwargs) -> CifarNet:
    """The widths of airbench's CIFAR-10 network."""
    return _cifarnet((64, 256, 256), stem_width=24, pretrained=pretrained, **kwargs)


@register_model
def cifarnet_fast(pretrained: bool = False, **kwargs) -> CifarNet:
    """The `fast` recipe's model, shaped as the CIFAR-100 speedrun's: widths 64/256/768, residual
    blocks, SiLU, a 24-filter stem for a whitened start, and airbench's logits scaled by 1/9: the
    max-pooled features of a residual net are large, and unscaled logits blow up in the first steps."""
    kwargs.setdefault("act_layer", "silu")
    return _cifarnet((64, 256, 768), stem_width=24, residual=True, logit_scale=1 / 9, pretrained=pretrained, **kwargs)
