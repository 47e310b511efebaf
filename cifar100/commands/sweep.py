"""Sweep files: a grid and/or a list of override sets, times seeds, expanded into named, validated runs.

A sweep file (YAML) says:

    name: side                      # the sweep: prefix of every run name, the W&B group
    recipe: best                    # the base recipe (a name, or a path relative to this file)
    overrides: {train.epochs: 200}  # fixed for every run
    runs:                           # override sets, one run each (`recipe:` may differ per set) ...
      - {}
      - {sched.name: step}
    grid: {optim.lr: [0.1, 0.2]}    # ... times every combination of these values ...
    seeds: [0, 1, 2]                # ... times the seeds

Every run is `train.py recipe=R <fixed> <command-line extras> <its own overrides> name=N sweep.name=S
sweep.overrides=[...]`, and every run's whole config is checked before any starts. A run's name is
the sweep's name plus the values only it has (`side-sched.name=step-s1`), so it stays the same when
the file gains other runs, and a requeued or re-submitted task finds its own folder.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cifar100.config import Config, load_config, parse_override, read_yaml, whole_number
from cifar100.errors import UserError, shown

FILE_KEYS = ("name", "description", "recipe", "overrides", "runs", "grid", "seeds")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 120  # longer names fall back to <sweep>-<index>
# Runs one sweep may hold: every one is validated before any starts, and Slurm's
# default MaxArraySize (1001) takes array indexes 0-1000. Larger searches are several sweep files.
MAX_RUNS = 1000


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its index (the array task), name, own overrides and train.py arguments."""

    index: int
    name: str
    own: tuple[str, ...]  # key=value that set it apart from the other runs (recipe=... included)
    args: tuple[str, ...]  # the whole train.py argument list, but resume=
    config: Config


@dataclass(frozen=True)
class Sweep:
    """A sweep file, expanded and validated."""

    name: str
    path: Path
    runs: tuple[SweepRun, ...]


def load_sweep(path: str | Path, extra: list[str]) -> Sweep:
    """Read, expand, name and validate a sweep file; `extra` are command-line key=value for every run."""
    path = Path(path)
    spec = _read(path)
    name = _sweep_name(path, spec.get("name"))
    fixed = _mapping(path, spec, "overrides")
    sets = _override_sets(path, spec.get("runs"))
    grid = _grid(path, spec.get("grid"))
    seeds = _seeds(path, spec.get("seeds"))
    extra_keys = _check_extra(path, extra)
    for key in (*fixed, *grid, *(k for s in sets for k in s)):
        _check_key(path, key, in_runs=key not in fixed, seeds=seeds)
    _check_size(path, sets, grid, seeds)
    combos = [{**s, **dict(zip(grid, values))} for s in sets for values in itertools.product(*grid.values())]
    varying = _varying(path, sets, grid, combos, extra_keys)
    default_recipe = spec.get("recipe")
    runs: list[SweepRun] = []
    names: dict[str, int] = {}
    for index, ((number, combo), seed) in enumerate(itertools.product(enumerate(combos), seeds or (None,))):
        own = tuple(f"{k}={_text(combo[k])}" for k in varying if k in combo)
        run_name = _run_name(name, own, seed, number, bool(varying))
        if run_name in names:
            raise UserError(
                f"{path}: runs {names[run_name]} and {index} are both named {run_name}: the same override set twice?"
            )
        names[run_name] = index
        recipe = _recipe(path, combo.get("recipe", default_recipe))
        # A key the command line gives wins over the file's fixed value, and is passed once.
        settings = [f"{k}={_text(v)}" for k, v in {**fixed, **combo}.items() if k != "recipe" and k not in extra_keys]
        args = (
            f"recipe={recipe}",
            *settings,
            *(a for a in extra if not a.startswith("resume=")),
            *([f"seed={seed}"] if seed is not None else []),
            f"name={run_name}",
            f"sweep.name={name}",
            f"sweep.overrides={_text(list(own))}",
        )
        runs.append(SweepRun(index, run_name, own, args, _validate(path, index, run_name, args)))
    return Sweep(name, path, tuple(runs))


def _sweep_name(path: Path, name: object) -> str:
    """The sweep's `name:`, checked: it starts every run folder's name."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise UserError(
            f"{path}: name: expected a word of letters, digits, '.', '_' or '-' that starts with a letter or "
            f"digit (it starts every run folder's name), got {shown(name)}"
        )
    return name


def _check_size(path: Path, sets: list[dict], grid: dict[str, list], seeds: list) -> None:
    """Refuse a key both in runs and in grid, and a sweep of more than MAX_RUNS runs."""
    for s in sets:
        clash = set(s) & set(grid)
        if clash:
            raise UserError(f"{path}: {min(clash)} is both in runs and in grid: give it in one of them")
    count = len(sets) * math.prod(len(v) for v in grid.values()) * max(len(seeds), 1)
    if count > MAX_RUNS:
        sizes = " x ".join(str(len(v)) for v in grid.values()) or "1"
        raise UserError(
            f"{path}: {count} runs ({len(sets)} override set(s) x {sizes} grid values x {max(len(seeds), 1)} "
            f"seed(s)); a sweep holds at most {MAX_RUNS}: split it into several files"
        )


def _varying(path: Path, sets: list[dict], grid: dict[str, list], combos: list[dict], extra_keys: set) -> list[str]:
    """The keys some runs set apart from others, the runs' keys first: they name the runs. The command
    line may not give one of them."""
    varying = [
        k
        for k in dict.fromkeys([*(k for s in sets for k in s), *grid])
        if len({_text(c[k]) if k in c else None for c in combos}) > 1
    ]
    overridden = [k for k in varying if k in extra_keys]
    if overridden:
        raise UserError(f"{overridden[0]}=... given on the command line, but the sweep {path} varies it")
    return varying


def task_args(sweep: Sweep, task: str) -> tuple[str, ...]:
    """The train.py arguments of array task `task` (an index into the runs)."""
    if whole_number("task", task) >= len(sweep.runs):
        raise UserError(
            f"task={task}: the sweep {sweep.path} has {len(sweep.runs)} runs, tasks 0-{len(sweep.runs) - 1}"
        )
    return sweep.runs[int(task)].args


def run_dir(run: SweepRun) -> Path:
    """Where the run's folder is (resume=auto continues it there)."""
    return Path(run.config.log.dir) / run.name


def listing(sweep: Sweep) -> str:
    """The runs (index, name, own overrides, state) and how to submit them."""
    width = max(len(r.name) for r in sweep.runs)
    lines = [
        f"{r.index:>3}  {r.name:<{width}}  {' '.join(r.own) or '(no own overrides)'}"
        + ("  [finished]" if (run_dir(r) / "summary.json").is_file() else "")
        for r in sweep.runs
    ]
    last = len(sweep.runs) - 1
    budgets = sorted({r.config.train.budget for r in sweep.runs} - {"none"})
    if budgets:
        # Each run plans within its own budget: the sweep's time is their sum here, its longest on an array.
        lines.append(
            f"budget: each run fits its own train.budget ({', '.join(budgets)}), measured and planned "
            "by itself; one after another here they take their sum, as an array each its own"
        )
    lines += [
        f"sweep {sweep.name}: {len(sweep.runs)} runs, every config checked",
        f"here:  cifar100 sweep {sweep.path} run",
        (
            f"Slurm: sbatch --array=0-{last} launch/slurm/sweep.sbatch {sweep.path}   "
            f"(--array=0-{last}%K runs at most K at once)"
        ),
    ]
    return "\n".join(lines)


def run_all(sweep: Sweep, started: float | None = None) -> list[Path]:
    """Train the runs one after another in this process: finished ones skipped, unfinished ones continued.
    The first run trained counts its budget from `started` (the command's start), each other from its own."""
    folders = []
    for run in sweep.runs:
        folder = run_dir(run)
        if (folder / "summary.json").is_file():
            print(f"sweep {sweep.name}: run {run.index} {run.name} finished already, skipped", flush=True)
        else:
            from cifar100.training.trainer import train  # heavy imports only when training

            print(f"sweep {sweep.name}: run {run.index} of {len(sweep.runs)}: {run.name}", flush=True)
            cfg = load_config(run.args[0].partition("=")[2], [*run.args[1:], "resume=auto"])
            folder, started = train(cfg, counted_from=started), None
        folders.append(folder)
    return folders


def _validate(path: Path, index: int, name: str, args: tuple[str, ...]) -> Config:
    try:
        return load_config(args[0].partition("=")[2], list(args[1:]))
    except UserError as err:
        raise UserError(f"{path}: run {index} ({name}): {err}") from None


def _read(path: Path) -> dict[str, Any]:
    spec = read_yaml(path, "sweep file")
    if "parameters" in spec and "method" in spec:
        raise UserError(f"{path}: this is a W&B Sweeps config: start it with `wandb sweep {path}` and `wandb agent`")
    for key in spec:
        if key not in FILE_KEYS:
            close = difflib.get_close_matches(str(key), FILE_KEYS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; a sweep file has {', '.join(FILE_KEYS)}"
            raise UserError(f"{path}: unknown sweep key {shown(key)}{hint}")
    if "recipe" not in spec:
        raise UserError(f"{path}: recipe: missing (the base recipe every run starts from)")
    return spec


def _mapping(path: Path, spec: dict[str, Any], key: str) -> dict[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key}: expected a mapping of config keys to values, got {shown(value)}")
    return {str(k): v for k, v in value.items()}


def _override_sets(path: Path, runs: Any) -> list[dict[str, Any]]:
    if runs is None:
        return [{}]
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) or r is None for r in runs):
        raise UserError(f"{path}: runs: expected a non-empty list of override mappings ({{}} is the recipe as it is)")
    return [{str(k): v for k, v in (r or {}).items()} for r in runs]


def _grid(path: Path, grid: Any) -> dict[str, list[Any]]:
    if grid is None:
        return {}
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{path}: grid: empty; give each key a list of values, e.g. grid: {{optim.lr: [0.1, 0.2]}}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid: {key}: expected a non-empty list of values, got {shown(values)}")
    return {str(k): v for k, v in grid.items()}


def _seeds(path: Path, seeds: Any) -> list[int]:
    if seeds is None:
        return []
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise UserError(f"{path}: seeds: expected a list of distinct whole numbers, e.g. seeds: [0, 1, 2]")
    return seeds


def _check_key(path: Path, key: str, in_runs: bool, seeds: list[int]) -> None:
    if key in ("name", "resume") or key.split(".")[0] == "sweep":
        raise UserError(f"{path}: {key} cannot be set in a sweep: the sweep names its runs and resumes them")
    if key == "seed" and (seeds or in_runs):
        raise UserError(f"{path}: seed: list the seeds as seeds: [...], not as an override")
    if key == "recipe" and not in_runs:
        raise UserError(f"{path}: overrides: recipe: give the base recipe as the file's own recipe: key")


def _check_extra(path: Path, extra: list[str]) -> set[str]:
    keys = set()
    for item in extra:
        key, value = parse_override(item)
        if key == "resume" and value == "auto":
            continue  # every run resumes anyway
        if key in ("recipe", "name", "resume", "seed") or key.split(".")[0] == "sweep":
            raise UserError(f"{item}: the sweep file {path} sets {key} for its runs")
        keys.add(key)
    return keys


def _recipe(path: Path, recipe: Any) -> str:
    if not isinstance(recipe, str) or not recipe:
        raise UserError(f"{path}: recipe: expected a recipe name or a .yaml path, got {shown(recipe)}")
    beside = path.parent / recipe  # a recipe path is relative to the sweep file, like a recipe's base:
    return str(beside) if beside.suffix in (".yaml", ".yml") and beside.is_file() else recipe


def _text(value: Any) -> str:
    """A value as the command line writes it: YAML that parses back to the same value."""
    if isinstance(value, str) and _parses_as(value, value):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text.removesuffix("\n...").strip()


def _parses_as(text: str, value: Any) -> bool:
    try:
        return yaml.safe_load(text) == value and "\n" not in text
    except yaml.YAMLError:
        return False


def _run_name(sweep: str, own: tuple[str, ...], seed: int | None, number: int, varies: bool) -> str:
    """`<sweep>-<key>=<value>...-s<seed>`: one path component; `-base` for a run that sets none of the
    varying keys; `<sweep>-<config number>` where the values would make it too long."""
    parts = [sweep]
    for item in own:
        key, _, value = item.partition("=")
        parts.append(key + "=" + re.sub(r"[^A-Za-z0-9._,+-]", "_", re.sub(r"[\[\]'\" ]", "", value)))
    if varies and not own:
        parts.append("base")
    name = "-".join(parts)
    if len(name) > MAX_NAME:
        name = f"{sweep}-{number:03d}"
    return name + (f"-s{seed}" if seed is not None else "")
