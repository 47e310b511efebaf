"""Typed run configuration: recipes (YAML with `base:` inheritance) plus `key=value` overrides.

The schema is a tree of frozen dataclasses; its defaults are the values a recipe leaves out.
Loading goes recipe file -> merged dict (bases first) -> overrides -> validated dataclasses,
and every mistake on the way is a `UserError` with one line that says how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar100.errors import UserError, clip, shown

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


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
# What YAML (a recipe, a sweep file, a command-line value) may hold: a recipe is tens of keys a few
# levels deep, so these refuse only what would exhaust the stack or memory ("billion laughs" aliases).
MAX_DEPTH = 50  # nested collections
MAX_NODES = 100_000  # values once every alias is expanded
MAX_BASES = 32  # recipes in one `base:` chain
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


def rules(key: str) -> dict[str, Any]:
    """The rules `setting` put on the field at dotted `key` (none set, for a plain field)."""
    cls, parts = Config, key.split(".")
    for part in parts[:-1]:
        cls = _hints(cls)[part]
    found = {f.name: f for f in dataclasses.fields(cls)}[parts[-1]]
    return {**setting(None).metadata, **found.metadata}


def is_launch_key(key: str) -> bool:
    """True for a dotted key (or one under a section) that only says where and how a run is launched."""
    parts = key.split(".")
    return any(
        _known(".".join(parts[:i])) and rules(".".join(parts[:i])).get("launch") for i in range(1, len(parts) + 1)
    )


def _known(key: str) -> bool:
    return key in _key_set()


@functools.cache
def _key_set() -> frozenset[str]:
    return frozenset(all_keys())


def available_recipes() -> dict[str, Path]:
    """Recipe name -> file, for every YAML file in `recipes/`."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """The recipe's one-line `description:` (empty when it has none)."""
    return str(read_yaml(path).get("description", ""))


def load_config(recipe: str | None, overrides: list[str]) -> Config:
    """Resolve a recipe name or path plus `key=value` overrides into a validated Config."""
    raw: dict[str, Any] = {}
    if recipe:
        path = _find_recipe(recipe)
        raw = _resolve_bases(path, seen=())
        raw.setdefault("name", path.stem)
        raw["recipe"] = path.stem if path.parent == RECIPES_DIR else str(path)
    return apply_overrides(raw, overrides)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> Config:
    """Plain config data (a recipe, or the config a checkpoint saved) plus `key=value` overrides, validated."""
    raw = copy.deepcopy(raw)
    given: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        # A key given twice (or a section and a key inside it) is refused, like a duplicate key in a recipe.
        twice = next((k for k in given if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if twice is not None:
            raise UserError(
                f"{clip(given[twice])} and {clip(item)}: {min(twice, key, key=len)} is given twice on the "
                "command line; give it once"
            )
        given[key] = item
        _set_dotted(raw, key, value)
    return from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value`. A text key takes the value exactly as typed (`name=007`, `train.precision=no`),
    or unquoted when it is a quoted YAML string; any other key parses it as a YAML scalar or flow list
    (`augment.mean=[0.5,0.5,0.5]`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"expected key=value, got {shown(item)}")
    if key not in _key_set():
        raise _unknown_key(key)
    hint = _leaf_hint(key)
    if hint is str or (_is_optional_str(hint) and text not in ("null", "~")):
        return key, _unquoted(text)
    try:
        value = _load_yaml(text) if text != "" else ""
    except YamlLimit as err:
        raise UserError(f"{key}: {err}") from None
    except yaml.YAMLError:
        raise UserError(f"cannot parse the value of {key}: {shown(text)} is not a YAML scalar or list") from None
    return key, value


def whole_number(key: str, text: str, low: int = 0) -> int:
    """A command's own `key=N` (`task=`, `steps=`) as a person means it: ASCII digits only (Python's
    `isdigit` and `int` also take '²', '٣' and '1_0'), at least `low`; anything else is one line."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise UserError(f"{key}={shown(text)}: expected a whole number, written with the digits 0-9")
    if int(text) < low:
        raise UserError(f"{key}={text}: must be at least {low}")
    return int(text)


def _unquoted(text: str) -> str:
    if text[:1] in ("'", '"'):
        try:
            value = _load_yaml(text)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, str) else text
    return text


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, naming the first bad key or value."""
    return _build(Config, raw, prefix="")


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


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in schema order, that reads back the same under YAML 1.1 and 1.2."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (leaves and sections)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        hint = _hints(cls)[f.name]
        # A hint is a class, never an instance: isinstance narrows is_dataclass's answer to a type.
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, key + "."))
    return keys


def _find_recipe(recipe: str) -> Path:
    recipes = available_recipes()
    if recipe in recipes:
        return recipes[recipe]
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    names = ", ".join(recipes) or "(none)"
    raise UserError(f"unknown recipe {shown(recipe)}: available recipes are {names}, or give a path to a .yaml file")


class YamlLimit(yaml.YAMLError):
    """YAML beyond MAX_DEPTH or MAX_NODES: its message is one short line, never the value."""


class _Loader(yaml.SafeLoader):
    """YAML as people now read it (the 1.2 core schema): only true/false are booleans, numbers are
    decimal, 0o octal or 0x hex (no `1:30` sexagesimals, no `1_000`) and nothing is a date, so
    `precision: no` is the text "no"; a key given twice in one mapping is an error. Nesting deeper
    than MAX_DEPTH, or more than MAX_NODES values once aliases are expanded, is refused."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlLimit(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        try:
            return int(text[2:], 8 if text[1] == "o" else 16) if text[:2] in ("0o", "0x") else int(text, 10)
        except (ValueError, IndexError):
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(text)} is not an integer", node.start_mark
            ) from None

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values a document holds with every alias expanded (a node counted once per place it
    appears) without expanding anything, so an alias bomb is refused at once; refuse a cycle too."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # collections whose children are still being counted
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        children = _children(node)
        if counted:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_NODES:
                raise YamlLimit(f"more than {MAX_NODES} values once its aliases are expanded")
        elif id(node) in open_:
            raise YamlLimit("an alias refers to a collection that holds it")
        elif id(node) not in size:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


_STR, _INT, _FLOAT = "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp", _INT, _FLOAT)
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# The YAML 1.2 core schema's numbers (the int resolver first: "12" also matches the float one).
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)
_Loader.add_constructor(_INT, _Loader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """Quotes a text that YAML 1.1 (PyYAML's safe_load) or 1.2 (our loader) would read as anything
    else: `1e5`, `0o17`, `no` and `1:30` stay texts for both."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == _STR:
            for candidate, regexp in _Loader.yaml_implicit_resolvers.get(value[:1] or None, []):
                if regexp.match(value):
                    return candidate
        return tag


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except (ValueError, TypeError, OverflowError) as err:  # an explicit tag on a bad value: `!!float abc`
        raise yaml.YAMLError(clip(str(err))) from None


def parse_yaml(text: str) -> Any:
    """A command-line value (`seeds=[0,1]`) read as the recipes are: YAML 1.2 core, within the limits above."""
    return _load_yaml(text)


def read_yaml(path: Path, what: str = "recipe") -> dict[str, Any]:
    """A YAML file that holds a mapping (a recipe, a sweep file), or a UserError naming `what` it should be."""
    try:
        data = _load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8") from None
    except YamlLimit as err:
        raise UserError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({clip(' '.join(str(err).split()), 400)})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} must be a mapping of keys, got {type(data).__name__}")
    return data


def _resolve_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The recipe merged over its `base:` chain (a base may be a recipe name or a path)."""
    if path.resolve() in seen:
        chain = " -> ".join(p.stem for p in (*seen, path.resolve()))
        raise UserError(clip(f"recipe inheritance loops: {chain}", 400))
    if len(seen) >= MAX_BASES:
        raise UserError(f"{path}: more than {MAX_BASES} recipes in one base: chain (from {seen[0]})")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    beside = path.parent / str(base)  # a relative base path is relative to the recipe that names it
    base_path = beside if beside.suffix in (".yaml", ".yml") and beside.is_file() else _find_recipe(str(base))
    merged = _resolve_bases(base_path, (*seen, path.resolve()))
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_hint(key: str) -> Any:
    cls, parts = Config, key.split(".")
    for part in parts:
        cls = _hints(cls)[part] if dataclasses.is_dataclass(cls) else None
    return cls


def _is_optional_str(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and set(typing.get_args(hint)) == {
        str,
        type(None),
    }


def _unknown_key(key: str) -> UserError:
    keys = all_keys()
    depth = key.count(".")
    # Compare with keys of the same depth first: `optim.lrr` means `optim.lr`, not `optim`.
    same_depth = [k for k in keys if k.count(".") == depth]
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in same_depth), reverse=True)
    close = [k for score, k in scored[:2] if score >= 0.6 and score >= scored[0][0] - 0.05]
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
        # `lr` means optim.lr, not optim.muon.lr: the shallowest keys of that name.
        close = [k for k in same_leaf if k.count(".") == min(k.count(".") for k in same_leaf)][:2]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `cifar100 show` lists every key"
    return UserError(f"unknown config key {shown(key)}{hint}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {shown(raw)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key(prefix + str(key))
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = prefix + f.name
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a class, as in all_keys
            default = getattr(cls(), f.name)
            merged = _deep_merge(to_dict(default), raw[f.name]) if isinstance(raw[f.name], dict) else raw[f.name]
            values[f.name] = _build(hint, merged, key + ".")
        else:
            values[f.name] = _coerce(key, raw[f.name], hint)
    return cls(**values)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one leaf against its type (ints are accepted as floats) and its closed vocabulary."""
    origin = typing.get_origin(hint)
    result = _MISMATCH
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            result = _coerce_plain(value, option)
            if result is not _MISMATCH:
                break
    elif origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            items = [_coerce_plain(v, item) for v in value]
            if _MISMATCH not in items:
                result = tuple(items)
    else:
        result = _coerce_plain(value, hint)
    if result is _MISMATCH:
        raise UserError(f"{key}={shown(value)}: expected {_type_name(hint)}, got {type(value).__name__}")
    if result is not None:
        _check_rules(key, value, result, rules(key))
    return result


def _check_rules(key: str, value: Any, result: Any, rule: dict[str, Any]) -> None:
    """A value of the right type, held to the rules `setting` put on its field."""
    choices = rule.get("choices")
    if choices and isinstance(result, str) and result not in choices:  # a number is held to the bounds
        low, high = rule.get("low"), rule.get("high")
        whole = isinstance(low, int)  # an int bound: the key's number is an int
        number = (
            ""
            if low is None
            else f" or a {'whole ' if whole else ''}number" + ("" if whole else f" from {low} to {high}")
        )
        raise UserError(f"{key}={shown(value)}: expected one of {', '.join(choices)}{number}")
    if rule.get("component") and (len(result) > MAX_NAME or not RUN_NAME.fullmatch(result)):
        raise UserError(
            f"{key}={shown(value)}: must name one folder inside log.dir: letters, digits and . _ - + = , @, "
            f"starting with a letter or digit, at most {MAX_NAME} characters (plots, W&B, the report and "
            "the shell then all take it literally)"
        )
    if rule.get("duration") and result not in ("none", "auto"):
        parse_duration(key, result)
    length = rule.get("length")
    if length is not None and len(result) != length:
        raise UserError(f"{key}={shown(value)}: expected a list of {length} numbers, got {len(result)}")
    for number in result if isinstance(result, tuple) else (result,):
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if not math.isfinite(number):
            raise UserError(f"{key}={shown(value)}: must be a finite number")
        low, high, above = rule.get("low"), rule.get("high"), rule.get("above")
        if low is not None and number < low:
            raise UserError(f"{key}={shown(value)}: must be at least {low}")
        if above is not None and number <= above:
            raise UserError(f"{key}={shown(value)}: must be greater than {above}")
        if high is not None and number > high:
            raise UserError(f"{key}={shown(value)}: must be at most {high}")


# A wall-clock duration: hours, minutes and seconds in that order, each optional, at least one.
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
MIN_BUDGET_SECONDS = 10.0  # below this not even the start (imports, data, model) fits here
MAX_BUDGET_SECONDS = 366 * 86_400.0


def parse_duration(key: str, text: str) -> float:
    """`90s`, `10m`, `2h30m`, `1.5h` in seconds; a UserError for anything else, with the accepted forms."""
    match = _DURATION.fullmatch(text.strip().lower())
    forms = "a duration such as 90s, 10m, 2h30m or 1.5h, or none, or auto (under Slurm)"
    if not text.strip() or match is None or not any(match.groups()):
        hint = f" (a unit is needed: {text}s or {text}m?)" if text.strip().replace(".", "", 1).isdigit() else ""
        raise UserError(f"{key}={text[:80]!r}: expected {forms}{hint}")
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < MIN_BUDGET_SECONDS:
        raise UserError(
            f"{key}={text!r}: a budget must be at least {MIN_BUDGET_SECONDS:g}s (the start alone takes "
            "seconds); a run also refuses, once it has measured itself, a budget too short for one step"
        )
    if total > MAX_BUDGET_SECONDS:
        raise UserError(f"{key}={text[:80]!r}: must be at most 366 days")
    return total


_MISMATCH = object()
_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def _coerce_plain(value: Any, hint: Any) -> Any:
    if hint is type(None):
        return None if value is None else _MISMATCH
    if hint is bool:
        if isinstance(value, str):  # what shells and YAML 1.1 users type for a switch
            return _WORDS.get(value.lower(), _MISMATCH)
        return value if isinstance(value, bool) else _MISMATCH
    if typing.get_origin(hint) is tuple:  # a list inside a list (data.sizes)
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        items = [_coerce_plain(v, typing.get_args(hint)[0]) for v in value]
        return _MISMATCH if _MISMATCH in items else tuple(items)
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if hint is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users mean a number.
            try:
                return float(value)
            except ValueError:
                return _MISMATCH
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _MISMATCH
    if hint is str:
        # `name=2024` parses as an int in YAML; a number is still a fine name.
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return str(value) if ok else _MISMATCH
    return _MISMATCH
