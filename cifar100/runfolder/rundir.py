"""The run folder: one writer at a time, and what a resume makes of the folder it continues or forks.

A run locks its folder (`flock` on `<run>/.lock`) before it changes anything there and holds the
lock until the process ends; the kernel drops it when the process dies, `kill -9` included, so
it is never stale. A second run on a locked folder is refused with one line. Under a launcher
only the main process takes it: the others never write the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import CHECKPOINT_FILES, is_complete, point_link
from cifar100.runfolder.safe_files import METRICS_BYTES, WEIGHTS_BYTES, open_no_follow, read_text, require_regular
from cifar100.runfolder.tracking import read_metrics, rewrite_metrics, write_run_file

LOCK = ".lock"
_held: list[int] = []  # open lock files: the locks last as long as the process


def unique_run_dir(log_dir: str | Path, name: str) -> Path:
    """`<log_dir>/<name>`, or `<name>-2`, `-3`, ... when taken: a new run never overwrites one."""
    base = Path(log_dir)
    base.mkdir(parents=True, exist_ok=True)
    candidate, n = base / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = base / f"{name}-{n}"


def lock(run_dir: Path) -> Path:
    """Make this process the only writer of `run_dir` until it ends; returns `run_dir`.

    Refused with one line when another live process holds the folder, before anything in it changes.
    """
    fd = open_no_follow(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use by {holder}: a run folder has one writer at a time; wait for that "
            "run to end, or give this one another name="
        ) from None
    _held.append(fd)
    try:  # who holds it, for the message above; a full disk must not stop the run for it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass
    return run_dir


def run_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint folder lies in (`<run>/checkpoints/...`, set aside ones in
    `checkpoints/abandoned/` included), or None outside any."""
    return next((p.parent for p in checkpoint.parents if p.name == "checkpoints"), None)


def fork_history(checkpoint: Path, owner: Path) -> Path:
    """The metrics.jsonl a fork of `checkpoint` (of the run `owner`) takes its rows from: the run's,
    or for a checkpoint set aside in `checkpoints/abandoned/`, the rows kept beside it then."""
    if checkpoint.parent == owner / "checkpoints":
        return owner / "metrics.jsonl"
    return checkpoint.parent / "metrics.jsonl"


@dataclass(frozen=True)
class Located:
    """Where a run continues: its folder (None for a fork, made once the checkpoint has loaded), the
    checkpoint (or None) with its weights, train state and averaged weights when finding it meant
    reading them (so they are not read twice), the owner's checkpoints newer than it, and for a fork
    the run it forks."""

    run_dir: Path | None
    checkpoint: Path | None = None
    read: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None] | None = None
    newer: tuple[Path, ...] = ()
    fork_of: Path | None = None


@dataclass(frozen=True)
class Adopted:
    """The folder a run writes from now on, the metrics rows it continues, and whether it is a fork."""

    run_dir: Path
    rows: list[dict[str, Any]]
    forked: bool


def adopt(located: Located, log_dir: str, name: str, epochs_done: int) -> Adopted:
    """Make the located folder this run's, once its checkpoint has loaded (nothing changes before).

    Continuing its own run, the run keeps the rows up to the checkpoint's `epochs_done` and sets
    checkpoints newer than the chosen one aside in `checkpoints/abandoned/`. A fork (a checkpoint of
    another run) gets a new folder `<log_dir>/<name>` holding a copy of that checkpoint, of the best
    weights when they are not newer, and of the rows up to the checkpoint; the other run is only read.
    """
    if located.fork_of is not None:
        run_dir = lock(unique_run_dir(log_dir, name))
        checkpoint = cast(Path, located.checkpoint)  # a fork is of a checkpoint
        _copy_history(located.fork_of, checkpoint, run_dir)
        source = fork_history(checkpoint, located.fork_of)
    else:
        run_dir = cast(Path, located.run_dir)  # None only for a fork
        source = run_dir / "metrics.jsonl"
        if located.newer:
            _set_aside(cast(Path, located.checkpoint), located.newer)  # newer than the checkpoint found
    rows = [r for r in read_metrics(source) if r["epoch"] <= epochs_done]
    target = run_dir / "metrics.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if not target.exists() or read_text(target, METRICS_BYTES, "metrics file") != text:
        rewrite_metrics(target, rows)  # drops epochs logged after the checkpoint, and a torn last line
    return Adopted(run_dir, rows, located.fork_of is not None)


def _copy_history(source: Path, checkpoint: Path, run_dir: Path) -> None:
    """The checkpoint (and the best weights, unless newer than it) into the fork's checkpoints/."""
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir()
    best = (source / "checkpoints" / "best").resolve()
    # The run's best weights are the fork's history too when older than its checkpoint; not for a
    # checkpoint set aside, whose history parted from the run's.
    shared = checkpoint.parent == source / "checkpoints" and best.name.removeprefix("best-") <= checkpoint.name
    copies = [checkpoint] + ([best] if shared and is_complete(best) else [])
    for folder in copies:
        tmp = ckpt_dir / f".tmp-{folder.name}"  # complete or absent, as a checkpoint written here
        try:
            tmp.mkdir()
            for name in CHECKPOINT_FILES:  # what a checkpoint holds, and nothing else it may have beside
                if os.path.lexists(folder / name):
                    _copy_regular(folder / name, tmp / name)
            os.replace(tmp, ckpt_dir / folder.name)
        except (OSError, UserError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{folder}: not copied into {ckpt_dir} ({err}); the fork stops here") from None
    point_link(ckpt_dir, "last", checkpoint.name)
    if len(copies) == 2:
        point_link(ckpt_dir, "best", best.name)


def _copy_regular(source: Path, target: Path) -> None:
    """`shutil.copy2` of a regular file within the weights' bound (links followed): a FIFO or a device
    in a checkpoint folder would make the copy hang or never end."""
    require_regular(source, WEIGHTS_BYTES, "checkpoint file")
    shutil.copy2(source, target)


def _set_aside(checkpoint: Path, newer: tuple[Path, ...]) -> None:
    """Going back to an older checkpoint of the same run: keep the newer ones, out of resume=auto's way."""
    aside = unique_run_dir(checkpoint.parent / "abandoned", f"after-{checkpoint.name}")
    metrics = checkpoint.parent.parent / "metrics.jsonl"
    if metrics.exists():  # the rows the newer checkpoints continue, so that a fork of one has them
        write_run_file(aside / "metrics.jsonl", read_text(metrics, METRICS_BYTES, "metrics file"))
    for path in newer:
        os.replace(path, aside / path.name)
    point_link(checkpoint.parent, "last", checkpoint.name)
    warnings.warn(
        f"resuming {checkpoint.name}: the newer {', '.join(p.name for p in newer)} moved to {aside}", stacklevel=3
    )
