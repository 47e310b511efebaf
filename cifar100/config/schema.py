"""The run configuration's schema: a tree of frozen dataclasses whose defaults are the values a recipe
leaves out, each field with its rules beside it (`setting`), and the schema's plain-data forms."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from cifar100.errors import UserError, clip


def setting(
    default: Any,
    *,
    choices: tuple[str, ...] = (),
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    length: int | None = None,
    launch: bool = False,
    component: bool = False,
    duration: bool = False,
    doc: str = "",
) -> Any:
    """A config field with its rules beside it: a closed vocabulary (`choices`), inclusive bounds
    `low`/`high`, an exclusive lower bound `above` (for a list: for every item), a list's exact
    `length`, `component` for a text that names one folder, `duration` for a wall-clock time (or
    none / auto), and `launch` for keys that say where and how a run is launched and logged, not what it
    trains (a resume may change them, and the report does not tell runs apart by them)."""
    rules = {
        "choices": choices,
        "low": low,
        "high": high,
        "above": above,
        "length": length,
        "launch": launch,
        "component": component,
        "duration": duration,
        "doc": doc,
    }
    return field(default=default, metadata=rules)


# The names of the optimizer and schedule registries (training/optim.py): the config checks a name,
# the registry builds it, and a test holds the two to the same names.
OPTIMIZER_NAMES = ("sgd", "adam", "nadam", "adamw", "muon")
SCHEDULE_NAMES = ("cosine", "step", "plateau", "none", "wsd")


# Upper bounds that keep a typo from exhausting memory or overflowing before anything useful runs.
_MANY = 10**6
# A run name is what every consumer takes literally: a folder, a plot title, a W&B run, a report entry, a shell word.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,@-]*")
MAX_NAME = 200
_SEED_MAX = 2**32 - 1  # numpy's and torch's seeding accept up to this


MIN_SIZE, MAX_SIZE = 16, 32  # progressive resizing: 16 px still leaves a ResNet (8x down) 2x2, and CIFAR's own


def check_sizes(sizes: tuple[tuple[float, ...], ...]) -> None:
    """data.sizes: [size, fraction] pairs, sizes whole and rising within MIN_SIZE..MAX_SIZE, fractions
    positive and summing to 1; a UserError in one line otherwise."""
    if not sizes:
        return
    text = f"data.sizes={clip(str([list(p) for p in sizes]))}"
    if any(len(pair) != 2 for pair in sizes):
        raise UserError(f"{text}: expected [size, fraction] pairs, e.g. [[20, 0.3], [24, 0.3], [32, 0.4]]")
    values = [v for pair in sizes for v in pair]
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{text}: must hold finite numbers")
    for size, fraction in sizes:
        if size != int(size) or not MIN_SIZE <= size <= MAX_SIZE:
            raise UserError(f"{text}: each size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}")
        if fraction <= 0:
            raise UserError(f"{text}: each fraction of the run must be greater than 0")
    if any(a[0] >= b[0] for a, b in itertools.pairwise(sizes)):
        raise UserError(f"{text}: sizes must rise from one phase to the next")
    if abs(sum(f for _, f in sizes) - 1.0) > 1e-6:
        raise UserError(f"{text}: the fractions must add up to 1 (they add up to {sum(f for _, f in sizes):g})")


@dataclass(frozen=True)
class DataConfig:
    root: str = setting("data", launch=True)
    download: bool = setting(True, launch=True)
    val_size: int = setting(0, low=0, high=49_999)
    batch_size: int = setting(512, low=1, high=50_000)
    workers: int = setting(8, low=0, high=256, launch=True)
    train_limit: int = setting(0, low=0, high=_MANY, doc="a stratified, seeded choice of N training images; 0 = all")
    test_limit: int = setting(0, low=0, high=_MANY, doc="a stratified, seeded choice of N test images; 0 = all")
    eval_batch_size: int = setting(1024, low=1, high=65_536)
    pipeline: str = setting(
        "reference",
        choices=("reference", "device"),
        doc="reference: per-sample torchvision in workers; device: batched on the device",
    )
    sizes: tuple[tuple[float, ...], ...] = setting(
        (),
        doc="progressive resizing: [[size, fraction of the run], ...], smallest first, fractions summing to 1; "
        "training images are scaled to each size in turn (evaluation stays at 32 px); [] = 32 px throughout",
    )

    def __post_init__(self) -> None:
        check_sizes(self.sizes)


@dataclass(frozen=True)
class MixConfig:
    prob: float = setting(0.0, low=0.0, high=1.0)
    alpha: float = setting(1.0, above=0.0, high=1e3)


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = setting(4, low=0, high=32)
    hflip: float | str = setting(
        0.5,
        choices=("alternating",),
        low=0.0,
        high=1.0,
        doc="the chance of a mirror image; alternating: each image mirrored on every other epoch "
        "(the first epoch's choice drawn per image from the seed)",
    )
    vflip: float = setting(0.0, low=0.0, high=1.0)
    color_jitter: float = setting(0.0, low=0.0, high=1.0)
    autoaugment: str = setting("none", choices=("none", "cifar10", "imagenet", "svhn"))
    mean: tuple[float, ...] = setting((0.5071, 0.4865, 0.4409), low=-1e3, high=1e3, length=3)
    std: tuple[float, ...] = setting((0.2673, 0.2564, 0.2762), above=0.0, high=1e3, length=3)
    cutmix: MixConfig = MixConfig(prob=0.0, alpha=1.0)
    mixup: MixConfig = MixConfig(prob=0.0, alpha=0.2)
    label_smoothing: float = setting(0.0, low=0.0, high=1.0)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    act: str | None = setting(None, doc="None keeps the model's own activations")
    cifar_stem: bool = True
    drop_rate: float = setting(0.0, low=0.0, high=1.0)
    whiten: bool = setting(False, doc="cifarnet: start the 2x2 stem as a whitening of the training patches, kept fixed")
    init: str = setting(
        "default",
        choices=("default", "dirac"),
        doc="dirac: every conv with an odd square kernel and at least as many outputs as inputs starts as the "
        "identity on its first in-channels filters (the rest keep the model's own initialisation)",
    )


@dataclass(frozen=True)
class MuonConfig:
    """optim.name=muon: Muon for the hidden conv and linear weights, the rest by SGD at optim.lr."""

    lr: float = setting(0.05, low=0.0, high=1e3, doc="Muon's peak rate; the schedule scales it with optim.lr")
    momentum: float = setting(0.6, low=0.0, high=0.999_999, doc="Muon's momentum (Nesterov)")
    weight_decay: float = setting(
        0.0, low=0.0, high=1e3, doc="decoupled: each step scales the weights by 1 - lr x this"
    )
    ns_steps: int = setting(5, low=1, high=50, doc="Newton-Schulz iterations that orthogonalise each update")


@dataclass(frozen=True)
class LookaheadConfig:
    """timm's Lookahead around the optimizer: every `steps` steps the slow weights move `alpha` of the way."""

    steps: int = setting(0, low=0, high=_MANY, doc="k: the fast steps between slow updates; 0 = no lookahead")
    alpha: float = setting(0.5, above=0.0, high=1.0, doc="how far the slow weights move towards the fast ones")


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting("sgd", choices=OPTIMIZER_NAMES)
    lr: float = setting(0.1, low=0.0, high=1e10)  # a diverging rate is a test of the non-finite guard
    momentum: float = setting(0.9, low=0.0, high=1.0)
    nesterov: bool = False
    weight_decay: float = setting(5.0e-4, low=0.0, high=1e3)
    betas: tuple[float, ...] = setting((0.9, 0.999), low=0.0, high=0.999_999_9, length=2)
    no_decay_norm_bias: bool = False
    muon: MuonConfig = MuonConfig()
    lookahead: LookaheadConfig = LookaheadConfig()


@dataclass(frozen=True)
class SchedConfig:
    name: str = setting("cosine", choices=SCHEDULE_NAMES)
    warmup_epochs: float = setting(0.0, low=0.0, high=_MANY)
    warmup_lr: float = setting(1.0e-4, low=0.0, high=1e3)
    min_lr: float = setting(0.0, low=0.0, high=1e3)
    step_epochs: int = setting(30, low=1, high=_MANY, doc="step: decay every this many epochs")
    gamma: float = setting(0.1, above=0.0, high=1.0, doc="step and plateau: multiply the rate by this")
    patience: int = setting(10, low=0, high=_MANY, doc="plateau: epochs without improvement before a decay")
    cooldown: float = setting(
        0.2, low=0.0, high=1.0, doc="wsd: the share of the run's steps, at its end, that decays the rate to min_lr"
    )


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the weights (timm's ModelEmaV3), updated after optimizer steps."""

    enabled: bool = False
    decay: float = setting(
        0.999,
        low=0.0,
        high=0.999_999_9,
        doc="weight the average keeps at each update; its horizon is about 1 / (1 - decay) updates",
    )
    warmup: bool = setting(
        True, doc="decay after k updates = min(decay, 1 - k ** -warmup_power): early weights fade fast"
    )
    warmup_power: float = setting(
        0.75, above=0.0, high=10.0, doc="timm's warm-up power: 3/4 for short runs, 2/3 for long"
    )
    every: int = setting(1, low=1, high=_MANY, doc="update every N optimizer steps (the decay applies per update)")
    select: str = setting(
        "model", choices=("model", "ema"), doc="the weights whose score picks the best epoch, saved as checkpoints/best"
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(200, low=1, high=100_000)
    steps: int = setting(
        0, low=0, high=10**9, doc="the run's optimizer steps, laid over by the schedule; 0 = train.epochs of steps"
    )
    budget: str = setting(
        "none",
        duration=True,
        doc="none | auto (a Slurm job's time left) | a duration (90s, 10m, 2h30m, 1.5h): the steps are planned "
        "to end the whole run in it, train.epochs (or train.steps) capping them",
    )
    replan: bool = setting(True, doc="with a budget: re-plan the rest of the schedule when the machine changes speed")
    precision: str = setting("bf16", choices=("no", "fp16", "bf16"))
    grad_accum: int = setting(1, low=1, high=4096)
    micro_batch: int | str | None = setting(
        None,
        choices=("auto",),
        low=1,
        high=65_536,
        launch=True,  # how a run fits its device, not what it trains: a resume on a smaller one may set it
        doc="null: each process trains its whole batch at once; N: in micro-batches of N images, gradients "
        "summed to the same step; auto: the largest micro-batch that fits, found by trying the real step",
    )
    clip_grad: float | None = setting(None, above=0.0, high=1e6)
    channels_last: bool = True
    compile: bool = setting(False, launch=True)
    threads: int = setting(0, low=0, high=1024, launch=True, doc="CPU intra-op threads; 0 = the library default")
    keep_last: int = setting(2, low=1, high=_MANY, launch=True, doc="step checkpoints kept")
    checkpoint_every_steps: int = setting(
        0, low=0, high=_MANY, launch=True, doc="also checkpoint every N optimizer steps; 0 = epoch ends only"
    )
    max_bad_steps: int = setting(0, low=0, high=_MANY, launch=True, doc="non-finite losses skipped before a stop")
    pause_at_step: int = setting(
        0,
        low=0,
        high=10**9,
        launch=True,  # where this process stops, not what the run trains: resume=auto goes on exactly
        doc="checkpoint at this optimizer step and exit 0 without a summary (tune's rungs); 0 = never",
    )
    ema: EmaConfig = EmaConfig()


@dataclass(frozen=True)
class EvalConfig:
    tta: str = setting(
        "none",
        choices=("none", "flip"),
        doc="test-time augmentation of every evaluation: flip averages each image's logits with its mirror's",
    )


@dataclass(frozen=True)
class WandbConfig:
    """Where W&B logs; the WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY and WANDB_DIR environment variables
    win over a recipe's values and these defaults, a `log.wandb.*` on the command line over them."""

    mode: str = setting("offline", choices=("online", "offline", "disabled"))
    project: str = "cifar100"
    entity: str | None = None
    dir: str | None = setting(None, doc="the folder W&B writes its files under; None = the run folder")


@dataclass(frozen=True)
class LogConfig:
    dir: str = "runs"
    wandb: WandbConfig = WandbConfig()
    progress: bool = setting(True, doc="progress bar on the main process")
    warn_hours: float = setting(
        24.0, above=0.0, high=1e6, doc="warn once when the measured projection of the whole run exceeds this many hours"
    )


@dataclass(frozen=True)
class SweepConfig:
    name: str = ""  # the sweep this run belongs to (`cifar100 sweep`); its W&B group
    overrides: tuple[str, ...] = ()  # the key=value that set this run apart from the sweep's others


@dataclass(frozen=True)
class Config:
    name: str = setting(
        "run", launch=True, component=True, doc="the run folder's name under log.dir: one path component"
    )
    recipe: str = setting("", launch=True)
    description: str = setting("", launch=True)
    reached: str = setting("", launch=True, doc="what the recipe reached and where: `cifar100 recipes` prints it")
    seed: int = setting(0, low=0, high=_SEED_MAX)
    resume: str = setting(
        "none", launch=True, doc="none | auto (newest checkpoint of <log.dir>/<name>) | path to a checkpoint"
    )
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = setting(LogConfig(), launch=True)
    sweep: SweepConfig = setting(SweepConfig(), launch=True)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (lists, not tuples) for YAML and JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists become tuples so values compare and hash."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = _frozen(value)
    return flat


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value
