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
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar100.errors import UserError

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
    doc: str = "",
) -> Any:
    """A config field with its rules beside it: a closed vocabulary (`choices`), inclusive bounds
    `low`/`high`, an exclusive lower bound `above`
    (for a list: for every item), a list's exact `length`, `component` for a text that names one
    folder, and `launch` for keys that say where and how a run is launched and logged, not what it
    trains (a resume may change them, and the report does not tell runs apart by them)."""
    rules = {
        "choices": choices,
        "low": low,
        "high": high,
        "above": above,
        "length": length,
        "launch": launch,
        "component": component,
        "doc": doc,
    }
    return field(default=default, metadata=rules)


# The names of the optimizer and schedule registries (training/optim.py): the config checks a name,
# the registry builds it, and a test holds the two to the same names.
OPTIMIZER_NAMES = ("sgd", "adam", "nadam", "adamw")
SCHEDULE_NAMES = ("cosine", "step", "plateau", "none")


# Upper bounds that keep a typo from exhausting memory or overflowing before anything useful runs.
_MANY = 10**6
_SEED_MAX = 2**32 - 1  # numpy's and torch's seeding accept up to this


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


@dataclass(frozen=True)
class MixConfig:
    prob: float = setting(0.0, low=0.0, high=1.0)
    alpha: float = setting(1.0, above=0.0, high=1e3)


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = setting(4, low=0, high=32)
    hflip: float = setting(0.5, low=0.0, high=1.0)
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


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting("sgd", choices=OPTIMIZER_NAMES)
    lr: float = setting(0.1, low=0.0, high=1e10)  # a diverging rate is a test of the non-finite guard
    momentum: float = setting(0.9, low=0.0, high=1.0)
    nesterov: bool = False
    weight_decay: float = setting(5.0e-4, low=0.0, high=1e3)
    betas: tuple[float, ...] = setting((0.9, 0.999), low=0.0, high=0.999_999_9, length=2)
    no_decay_norm_bias: bool = False


@dataclass(frozen=True)
class SchedConfig:
    name: str = setting("cosine", choices=SCHEDULE_NAMES)
    warmup_epochs: float = setting(0.0, low=0.0, high=_MANY)
    warmup_lr: float = setting(1.0e-4, low=0.0, high=1e3)
    min_lr: float = setting(0.0, low=0.0, high=1e3)
    step_epochs: int = setting(30, low=1, high=_MANY, doc="step: decay every this many epochs")
    gamma: float = setting(0.1, above=0.0, high=1.0, doc="step and plateau: multiply the rate by this")
    patience: int = setting(10, low=0, high=_MANY, doc="plateau: epochs without improvement before a decay")


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
    mode: str = setting("offline", choices=("online", "offline", "disabled"))
    project: str = "cifar100"
    entity: str | None = None


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
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value`. A text key takes the value exactly as typed (`name=007`, `train.precision=no`),
    or unquoted when it is a quoted YAML string; any other key parses it as a YAML scalar or flow list
    (`augment.mean=[0.5,0.5,0.5]`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"expected key=value, got {item!r}")
    if key not in _key_set():
        raise _unknown_key(key)
    hint = _leaf_hint(key)
    if hint is str or (_is_optional_str(hint) and text not in ("null", "~")):
        return key, _unquoted(text)
    try:
        value = _load_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        raise UserError(f"cannot parse the value of {key}: {text!r} is not a YAML scalar or list") from None
    return key, value


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
    raise UserError(f"unknown recipe {recipe!r}: available recipes are {names}, or give a path to a .yaml file")


class _Loader(yaml.SafeLoader):
    """YAML as people now read it (the 1.2 core schema): only true/false are booleans and nothing is
    a date, so `precision: no` is the text "no"; a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: Path, what: str = "recipe") -> dict[str, Any]:
    """A YAML file that holds a mapping (a recipe, a sweep file), or a UserError naming `what` it should be."""
    try:
        data = _load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
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
        raise UserError(f"{key}={value!r}: expected {_type_name(hint)}, got {type(value).__name__}")
    if result is not None:
        _check_rules(key, value, result, rules(key))
    return result


def _check_rules(key: str, value: Any, result: Any, rule: dict[str, Any]) -> None:
    """A value of the right type, held to the rules `setting` put on its field."""
    choices = rule.get("choices")
    if choices and isinstance(result, str) and result not in choices:  # a number is held to the bounds
        number = " or a whole number" if rule.get("low") is not None else ""
        raise UserError(f"{key}={value!r}: expected one of {', '.join(choices)}{number}")
    if rule.get("component") and (result in ("", ".", "..") or "/" in result or "\0" in result):
        raise UserError(
            f"{key}={value!r}: must name one folder inside log.dir (not empty, '.', '..', nor containing '/')"
        )
    length = rule.get("length")
    if length is not None and len(result) != length:
        raise UserError(f"{key}={value!r}: expected a list of {length} numbers, got {len(result)}")
    for number in result if isinstance(result, tuple) else (result,):
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if not math.isfinite(number):
            raise UserError(f"{key}={value!r}: must be a finite number")
        low, high, above = rule.get("low"), rule.get("high"), rule.get("above")
        if low is not None and number < low:
            raise UserError(f"{key}={value!r}: must be at least {low}")
        if above is not None and number <= above:
            raise UserError(f"{key}={value!r}: must be greater than {above}")
        if high is not None and number > high:
            raise UserError(f"{key}={value!r}: must be at most {high}")


_MISMATCH = object()
_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def _coerce_plain(value: Any, hint: Any) -> Any:
    if hint is type(None):
        return None if value is None else _MISMATCH
    if hint is bool:
        if isinstance(value, str):  # what shells and YAML 1.1 users type for a switch
            return _WORDS.get(value.lower(), _MISMATCH)
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
