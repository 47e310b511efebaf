"""The schema's rules as the parsing checks them: the keys there are (with did-you-mean for the rest),
the rules `setting` put on each field, and wall-clock durations."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from typing import Any

from cifar100.config.schema import MAX_NAME, RUN_NAME, Config, setting
from cifar100.errors import UserError, shown


def rules(key: str) -> dict[str, Any]:
    """The rules `setting` put on the field at dotted `key` (none set, for a plain field)."""
    cls, parts = Config, key.split(".")
    for part in parts[:-1]:
        cls = type_hints(cls)[part]
    found = {f.name: f for f in dataclasses.fields(cls)}[parts[-1]]
    return {**setting(None).metadata, **found.metadata}


def is_launch_key(key: str) -> bool:
    """True for a dotted key (or one under a section) that only says where and how a run is launched."""
    parts = key.split(".")
    return any(
        _known(".".join(parts[:i])) and rules(".".join(parts[:i])).get("launch") for i in range(1, len(parts) + 1)
    )


def _known(key: str) -> bool:
    return key in key_set()


@functools.cache
def key_set() -> frozenset[str]:
    """Every dotted key of the schema, once."""
    return frozenset(all_keys())


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (leaves and sections)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        hint = type_hints(cls)[f.name]
        # A hint is a class, never an instance: isinstance narrows is_dataclass's answer to a type.
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, key + "."))
    return keys


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """A schema class's field types, resolved once."""
    return typing.get_type_hints(cls)


def leaf_hint(key: str) -> Any:
    """The type of the field at dotted `key` (None past a leaf)."""
    cls, parts = Config, key.split(".")
    for part in parts:
        cls = type_hints(cls)[part] if dataclasses.is_dataclass(cls) else None
    return cls


def unknown_key(key: str) -> UserError:
    """The one-line refusal of an unknown `key`, with the closest keys there are."""
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


def check_rules(key: str, value: Any, result: Any, rule: dict[str, Any]) -> None:
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
