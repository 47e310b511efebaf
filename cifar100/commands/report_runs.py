"""`cifar100 report`'s runs: the finished run folders the paths and globs name, read and checked,
and grouped into the table's columns.

Runs whose configs differ only in seed (and in where they ran) are repeats of one experiment:
they share a column. A run folder whose files are unreadable or impossible is left out with a
note naming the file.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar100.config import Config, flatten, from_dict, is_launch_key, read_yaml, to_dict
from cifar100.errors import UserError, printable
from cifar100.runfolder.records import summary_problem
from cifar100.runfolder.safe_files import TEXT_BYTES, read_json, require_regular
from cifar100.runfolder.tracking import read_metrics


@dataclass(frozen=True)
class Run:
    """One finished run folder, read."""

    path: Path
    label: str
    config: Config
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class Column:
    """One column of the table: a run, or the seeds of one experiment."""

    label: str
    runs: tuple[Run, ...]


def find_runs(patterns: list[str]) -> tuple[list[Run], list[str]]:
    """The finished run folders named by paths or glob patterns, and a note for each path skipped
    (shown with `printable`: a folder's name can drive no terminal)."""
    paths, skipped = [], []
    for pattern in patterns:
        # A folder that exists is itself, whatever characters ([, *, ?) its name holds.
        literal = Path(pattern).exists() or not glob.has_magic(pattern)
        matches = [pattern] if literal else sorted(glob.glob(pattern))
        if not matches:
            skipped.append(f"{pattern}: matches nothing")
        paths += [Path(m) for m in matches]
    folders = []
    for path in dict.fromkeys(paths):  # a folder named twice is one run
        if not path.is_dir():
            skipped.append(f"{path}: not a folder")
        elif not os.path.lexists(path / "summary.json"):
            skipped.append(f"{path}: no summary.json, not a finished run")
        else:
            folders.append(path)
    names = [p.name for p in folders]
    runs = []
    for path in folders:
        try:
            runs.append(
                _read_run(path, path.name if names.count(path.name) == 1 else f"{path.parent.name}/{path.name}")
            )
        except (UserError, FileNotFoundError) as err:  # a file gone since it was found
            skipped.append(str(err) if isinstance(err, UserError) else f"{path}: {err.strerror}")
    return runs, [printable(note) for note in skipped]


def _read_run(path: Path, label: str) -> Run:
    """A run folder read and checked; a UserError names the file that is malformed. Each file is
    read only when it is a regular file within its size bound (`safe_files`)."""
    require_regular(path / "config.yaml", TEXT_BYTES, "run's config")
    raw = read_yaml(path / "config.yaml", "run's config")  # with the recipes' limits on depth and aliases
    if not raw:
        raise UserError(f"{path / 'config.yaml'}: holds no config")
    summary = read_json(path / "summary.json", TEXT_BYTES, "run's summary")
    problem = summary_problem(summary)
    if problem:
        raise UserError(f"{path / 'summary.json'}: unreadable ({problem})")
    try:
        config = from_dict(raw)
    except UserError as err:
        raise UserError(f"{path / 'config.yaml'}: {err}") from None
    return Run(path, label, config, summary, read_metrics(path / "metrics.jsonl"))


def experiment_key(config: Config) -> tuple:
    """What a run trained, as a hashable value: its config without the launch-only keys."""
    flat = flatten(to_dict(config))
    return tuple(sorted((k, v) for k, v in flat.items() if k != "seed" and not is_launch_key(k)))


def group_runs(runs: list[Run]) -> list[Column]:
    """Columns in the order runs were given, seeds of one experiment together."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(experiment_key(run.config), []).append(run)
    columns = []
    for members in groups.values():
        recipe = members[0].config.recipe or members[0].config.name
        label = (
            members[0].label
            if len(members) == 1
            else f"{recipe} (seeds {', '.join(str(r.config.seed) for r in members)})"
        )
        columns.append(Column(_sweep_label(members) or label, tuple(members)))
    return _distinguish(columns)


def _sweep_label(members: list[Run]) -> str | None:
    """`side: sched.name=step (seeds 0, 1)`: a sweep's column is named by the values it varies."""
    sweep = members[0].config.sweep
    if not sweep.name:
        return None
    seeds = ", ".join(str(r.config.seed) for r in members)
    return f"{sweep.name}: {' '.join(sweep.overrides) or 'base'} (seed{'s' if len(members) > 1 else ''} {seeds})"


def _distinguish(columns: list[Column]) -> list[Column]:
    """Append the keys that differ to labels that would otherwise read the same."""
    out = []
    for column in columns:
        twins = [c for c in columns if c.label == column.label]
        if len(twins) == 1:
            out.append(column)
            continue
        mine = dict(experiment_key(column.runs[0].config))
        differs = [k for k in mine if any(dict(experiment_key(t.runs[0].config)).get(k) != mine[k] for t in twins)]
        out.append(Column(f"{column.label} [{', '.join(f'{k}={value_text(mine[k])}' for k in differs)}]", column.runs))
    return out


def value_text(value: Any) -> str:
    """A config value as the report writes it: floats in %g, sequences in parentheses."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(value_text(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)
