"""Typed run configuration: recipes (YAML with `base:` inheritance) plus `key=value` overrides.

The schema is a tree of frozen dataclasses; its defaults are the values a recipe leaves out.
Loading goes recipe file -> merged dict (bases first) -> overrides -> validated dataclasses,
and every mistake on the way is a `UserError` with one line that says how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cifar100.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"
    download: bool = True
    val_size: int = 0
    batch_size: int = 512
    workers: int = 8
    train_limit: int = 0  # use only the first N training images (stratified); 0 = all
    test_limit: int = 0  # evaluate on the first N test images; 0 = all
    eval_batch_size: int = 1024
    pipeline: str = "reference"  # reference: per-sample torchvision in workers; device: batched on the device


@dataclass(frozen=True)
class MixConfig:
    prob: float = 0.0
    alpha: float = 1.0


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 4
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.0
    autoaugment: str = "none"
    mean: tuple[float, ...] = (0.5071, 0.4865, 0.4409)
    std: tuple[float, ...] = (0.2673, 0.2564, 0.2762)
    cutmix: MixConfig = MixConfig(prob=0.0, alpha=1.0)
    mixup: MixConfig = MixConfig(prob=0.0, alpha=0.2)
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    act: str | None = None  # None keeps the model's own activations
    cifar_stem: bool = True
    drop_rate: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5.0e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    no_decay_norm_bias: bool = False


@dataclass(frozen=True)
class SchedConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1.0e-4
    min_lr: float = 0.0
    step_epochs: int = 30  # step: decay every this many epochs
    gamma: float = 0.1  # step and plateau: multiply the rate by this
    patience: int = 10  # plateau: epochs without test-loss improvement before a decay


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    precision: str = "bf16"
    grad_accum: int = 1
    clip_grad: float | None = None
    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # CPU intra-op threads; 0 = the library default
    keep_last: int = 2  # step checkpoints kept (older ones pruned once a new one is complete)
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N optimizer steps; 0 = epoch ends only
    max_bad_steps: int = 0  # non-finite losses skipped before the run stops


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "offline"
    project: str = "cifar100"
    entity: str | None = None


@dataclass(frozen=True)
class LogConfig:
    dir: str = "runs"
    wandb: WandbConfig = WandbConfig()
    progress: bool = True  # progress bar on the main process


@dataclass(frozen=True)
class SweepConfig:
    name: str = ""  # the sweep this run belongs to (`cifar100 sweep`); its W&B group
    overrides: tuple[str, ...] = ()  # the key=value that set this run apart from the sweep's others


@dataclass(frozen=True)
class Config:
    name: str = "run"
    recipe: str = ""
    description: str = ""
    seed: int = 0
    resume: str = "none"  # none | auto (newest checkpoint of <log.dir>/<name>) | path to a checkpoint
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    sweep: SweepConfig = SweepConfig()


# Closed vocabularies: a value outside them is caught before anything is built.
CHOICES = {
    "data.pipeline": ("reference", "device"),
    "augment.autoaugment": ("none", "cifar10", "imagenet", "svhn"),
    "optim.name": ("sgd", "adam", "nadam", "adamw"),
    "sched.name": ("cosine", "step", "plateau", "none"),
    "train.precision": ("no", "fp16", "bf16"),
    "log.wandb.mode": ("online", "offline", "disabled"),
}


# Lower bounds: a value below them would fail deep inside a library, or after an epoch of work.
MINIMUM = {
    "seed": 0, "data.val_size": 0, "data.batch_size": 1, "data.workers": 0, "data.train_limit": 0,
    "data.test_limit": 0, "data.eval_batch_size": 1, "augment.crop_padding": 0, "optim.lr": 0.0,
    "optim.weight_decay": 0.0, "sched.warmup_epochs": 0.0, "sched.step_epochs": 1, "sched.patience": 0,
    "train.epochs": 1, "train.grad_accum": 1, "train.threads": 0, "train.keep_last": 1,
    "train.checkpoint_every_steps": 0, "train.max_bad_steps": 0,
}

# Keys that say where and how a run is launched and logged, not what it trains: a resume may
# change them, and the report does not tell runs apart by them.
LAUNCH_KEYS = ("name", "recipe", "description", "resume", "data.root", "data.download", "data.workers", "log",
               "train.threads", "train.compile", "train.keep_last", "train.checkpoint_every_steps",
               "train.max_bad_steps", "sweep")


def is_launch_key(key: str) -> bool:
    """True for a dotted key under one of LAUNCH_KEYS."""
    return any(key == k or key.startswith(k + ".") for k in LAUNCH_KEYS)


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
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value`, parsing the value as a YAML scalar or flow list."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"expected key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        raise UserError(f"cannot parse the value of {key}: {text!r} is not a YAML scalar or list") from None
    return key, value


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
            flat[prefix + key] = tuple(value) if isinstance(value, list) else value
    return flat


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, in schema order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (leaves and sections)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
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
    raise UserError(f"unknown recipe {recipe!r}: available recipes are {names}, or give a path to a .yaml file")


def read_yaml(path: Path, what: str = "recipe") -> dict[str, Any]:
    """A YAML file that holds a mapping (a recipe, a sweep file), or a UserError naming `what` it should be."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
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
        raise UserError(f"recipe inheritance loops: {chain}")
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


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str) -> UserError:
    keys = all_keys()
    depth = key.count(".")
    # Compare with keys of the same depth first: `optim.lrr` means `optim.lr`, not `optim`.
    same_depth = [k for k in keys if k.count(".") == depth]
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in same_depth), reverse=True)
    close = [k for score, k in scored[:2] if score >= 0.6 and score >= scored[0][0] - 0.05]
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:2]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `cifar100 show` lists every key"
    return UserError(f"unknown config key {key!r}{hint}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
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
        if dataclasses.is_dataclass(hint):
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
        raise UserError(f"{key}={value!r}: expected {_type_name(hint)}, got {type(value).__name__}")
    choices = CHOICES.get(key)
    if choices and result not in choices:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(choices)}")
    if key in MINIMUM and result is not None and result < MINIMUM[key]:
        raise UserError(f"{key}={value!r}: must be at least {MINIMUM[key]}")
    return result


_MISMATCH = object()


def _coerce_plain(value: Any, hint: Any) -> Any:
    if hint is type(None):
        return None if value is None else _MISMATCH
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
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
