"""From a recipe and `key=value` overrides to a validated Config: every mistake on the way is a
`UserError` of one line that says how to fix it."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any

import yaml

from cifar100.config.rules import check_rules, key_set, leaf_hint, rules, type_hints, unknown_key
from cifar100.config.schema import Config, to_dict
from cifar100.config.yaml_io import RECIPES_DIR, YamlLimit, deep_merge, find_recipe, load_yaml, resolve_bases
from cifar100.errors import UserError, clip, shown


def load_config(recipe: str | None, overrides: list[str]) -> Config:
    """Resolve a recipe name or path plus `key=value` overrides into a validated Config."""
    raw: dict[str, Any] = {}
    if recipe:
        path = find_recipe(recipe)
        raw = resolve_bases(path, seen=())
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
    if key not in key_set():
        raise unknown_key(key)
    hint = leaf_hint(key)
    if hint is str or (_is_optional_str(hint) and text not in ("null", "~")):
        return key, _unquoted(text)
    try:
        value = load_yaml(text) if text != "" else ""
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
            value = load_yaml(text)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, str) else text
    return text


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, naming the first bad key or value."""
    return _build(Config, raw, prefix="")


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


def _is_optional_str(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and set(typing.get_args(hint)) == {
        str,
        type(None),
    }


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {shown(raw)}")
    hints = type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise unknown_key(prefix + str(key))
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = prefix + f.name
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a class, as in all_keys
            default = getattr(cls(), f.name)
            merged = deep_merge(to_dict(default), raw[f.name]) if isinstance(raw[f.name], dict) else raw[f.name]
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
        check_rules(key, value, result, rules(key))
    return result


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
