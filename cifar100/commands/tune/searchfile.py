"""Search files: a sweep file's grammar (name, recipe, overrides, grid, seeds) plus ranges to sample
and the search's own settings.

    name: lr-wd                       # the search: its folder <log.dir>/<name>/, the W&B group
    recipe: cpu                       # the base recipe (a name, or a path relative to this file)
    overrides: {data.val_size: 5000}  # fixed for every trial (a held-out split scores the rungs)
    grid: {optim.nesterov: [true, false]}        # choices, as in a sweep file
    search:                           # ranges (and choices) sampled per trial
      optim.lr: log(0.05, 1)          # log-uniform in [a, b]
      optim.weight_decay: log(1e-5, 1e-3)
      augment.label_smoothing: uniform(0, 0.3)
      data.batch_size: int(128, 512)  # a whole number in [a, b]
      model.act: [relu, silu]         # a choice
    sampler: random                   # grid | random (grid by default when every key is a list)
    trials: 9                         # settings tried (grid: every combination by default)
    reduction: 3                      # successive halving's factor: a third go on at each rung
    cooldown: 0.2                     # the cooldown branch's share of a scored run (WSD)
    top: 2                            # settings run again with seeds after the search ...
    seeds: [1, 2, 3]                  # ... with these seeds, scored on the test split
    seed: 0                           # the sampler's: same file and seed, same trials

Every value is checked, and every trial's config is validated, before anything runs.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cifar100.commands.sweep import SAFE_NAME, _mapping, _recipe, _seeds
from cifar100.config import all_keys, read_yaml
from cifar100.errors import UserError, shown

FILE_KEYS = (
    "name",
    "description",
    "recipe",
    "overrides",
    "grid",
    "search",
    "sampler",
    "trials",
    "reduction",
    "cooldown",
    "top",
    "seeds",
    "seed",
)
SAMPLERS = ("grid", "random")
# Keys the search sets for every trial, with why: a search over them would be overruled.
SET_BY_SEARCH = {
    "sched.name": "every trial trains with sched.name=wsd (warmup, constant rate, cooldown)",
    "sched.cooldown": "the cooldown is the search's own cooldown: key",
    "train.steps": "the rungs set every trial's length from the budget",
    "train.epochs": "the rungs set every trial's length from the budget",
    "train.budget": "the search's budget= is spent by the rungs, not by each trial",
    "train.pause_at_step": "the rungs pause every trial at their steps",
    "name": "the search names its trials",
    "resume": "the search resumes and forks its trials",
    "seed": "list the seeds of the re-runs as seeds: [...]",
    "log.dir": "the search's folder holds its trials",
}
_RANGE = re.compile(r"\s*(log|uniform|int)\s*\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*")


@dataclass(frozen=True)
class Range:
    """One key's values: `log`, `uniform` or `int` between low and high, or a list of `choices`."""

    kind: str  # log | uniform | int | choice
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchFile:
    """A search file, read and checked."""

    path: Path
    name: str
    recipe: str
    fixed: dict[str, Any]
    space: dict[str, Range]
    sampler: str
    trials: int | None  # None: the sampler's default
    reduction: int
    cooldown: float
    top: int
    seeds: tuple[int, ...]
    seed: int


def parse_range(key: str, value: Any) -> Range:
    """A search value: `log(a, b)`, `uniform(a, b)`, `int(a, b)` or a non-empty list of choices."""
    if isinstance(value, list):
        if not value:
            raise UserError(f"{key}: an empty list of choices; give at least one value")
        return Range("choice", choices=tuple(value))
    match = _RANGE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise UserError(
            f"{key}: {shown(value)} is not a range: expected log(a, b), uniform(a, b), int(a, b) or a list of choices"
        )
    kind, low, high = match.group(1), _number(key, match.group(2)), _number(key, match.group(3))
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise UserError(f"{key}: int({low:g}, {high:g}): both bounds must be whole numbers")
    if not low < high:
        raise UserError(
            f"{key}: {kind}({low:g}, {high:g}) is an empty or inverted range: the first bound must be lower"
        )
    if kind == "log" and low <= 0:
        raise UserError(f"{key}: log({low:g}, {high:g}): a log range needs both bounds above 0")
    return Range(kind, low, high)


def _number(key: str, text: str) -> float:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{key}: {shown(text)} is not a number")
    return float(value)


def load_search(path: str | Path) -> SearchFile:
    """Read and check a search file (its trials' configs are checked by `space.trials`)."""
    path = Path(path)
    spec = read_yaml(path, "search file")
    for key in spec:
        if key not in FILE_KEYS:
            close = difflib.get_close_matches(str(key), FILE_KEYS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; a search file has {', '.join(FILE_KEYS)}"
            raise UserError(f"{path}: unknown search file key {shown(key)}{hint}")
    name = spec.get("name")
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise UserError(f"{path}: name: expected a word of letters, digits, '.', '_' or '-', got {shown(name)}")
    recipe = _recipe(path, spec.get("recipe"))  # a path is relative to the file, as a sweep's
    fixed = _mapping(path, spec, "overrides")
    space = _space(path, spec)
    _check_keys(path, fixed, space)
    sampler = _sampler(path, spec, space)
    trials = spec.get("trials")
    if trials is not None:
        trials = _count(path, "trials", trials, 1)
    reduction = _count(path, "reduction", spec.get("reduction", 3), 2, "a reduction factor below 2 stops no one")
    cooldown = spec.get("cooldown", 0.2)
    if not isinstance(cooldown, (int, float)) or isinstance(cooldown, bool) or not 0 < cooldown < 1:
        raise UserError(f"{path}: cooldown: expected a share of the scored run between 0 and 1, got {shown(cooldown)}")
    seeds = _seeds(path, spec.get("seeds", [1, 2]))
    return SearchFile(
        path=path,
        name=name,
        recipe=recipe,
        fixed=fixed,
        space=space,
        sampler=sampler,
        trials=trials,
        reduction=reduction,
        cooldown=float(cooldown),
        top=_count(path, "top", spec.get("top", 1), 0),
        seeds=tuple(seeds),
        seed=_count(path, "seed", spec.get("seed", 0), 0),
    )


def _space(path: Path, spec: dict[str, Any]) -> dict[str, Range]:
    """The searched keys and their ranges: grid:'s lists as choices, then search:'s ranges."""
    space: dict[str, Range] = {}
    for key, values in _mapping(path, spec, "grid").items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid: {key}: expected a non-empty list of values, got {shown(values)}")
        space[key] = Range("choice", choices=tuple(values))
    for key, value in _mapping(path, spec, "search").items():
        if key in space:
            raise UserError(f"{path}: {key} is both in grid and in search: give it in one of them")
        try:
            space[key] = parse_range(key, value)
        except UserError as err:
            raise UserError(f"{path}: search: {err}") from None
    if not space:
        raise UserError(f"{path}: nothing to search: give grid: or search: a key and its values")
    return space


def _check_keys(path: Path, fixed: dict[str, Any], space: dict[str, Range]) -> None:
    """Refuse an unknown key, one the search sets itself, and one both fixed and searched."""
    known = set(all_keys())
    for key in [*fixed, *space]:
        if key in SET_BY_SEARCH:
            raise UserError(f"{path}: {key} cannot be set in a search: {SET_BY_SEARCH[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            raise UserError(
                f"{path}: unknown key {shown(key)}" + (f"; did you mean {', '.join(close)}?" if close else "")
            )
    clash = set(fixed) & set(space)
    if clash:
        raise UserError(f"{path}: {min(clash)} is both fixed (overrides) and searched: give it in one of them")


def _sampler(path: Path, spec: dict[str, Any], space: dict[str, Range]) -> str:
    """`sampler:` checked; by default grid where every key is a list of choices, else random."""
    sampler = spec.get("sampler", "grid" if all(r.kind == "choice" for r in space.values()) else "random")
    if sampler not in SAMPLERS:
        raise UserError(f"{path}: sampler: expected one of {', '.join(SAMPLERS)}, got {shown(sampler)}")
    if sampler == "grid" and any(r.kind != "choice" for r in space.values()):
        ranged = next(k for k, r in space.items() if r.kind != "choice")
        raise UserError(
            f"{path}: sampler: grid takes lists of choices only, and {ranged} is a range: use sampler: random"
        )
    return sampler


def _count(path: Path, key: str, value: Any, low: int, why: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(
            f"{path}: {key}: expected a whole number of at least {low}, got {shown(value)}"
            + (f" ({why})" if why else "")
        )
    return value
