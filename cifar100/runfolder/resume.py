"""Which run folder and checkpoint a run continues from (`resume=none|auto|PATH`), and whether it may.

`auto` takes the newest checkpoint that loads under `<log.dir>/<name>/checkpoints/` (a fresh
start in that folder when there is none), so a requeued job can always pass it. A path names a
checkpoint folder or a run folder: its run is continued when `<log.dir>/<name>` is that run's
folder, and forked into a new folder otherwise (see `rundir.adopt`). A checkpoint made with
another config is refused, naming the keys that differ, except the launch keys (where data lives,
worker counts, logging) and the recovery keys a diverged run may need (with a warning).

`locate` changes no file of any run: it makes and locks the folder of a new or continued run,
reads the checkpoint and checks it; everything else waits until the checkpoint has loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from cifar100.config import flatten, is_launch_key
from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import (
    PREFIX,
    Snapshot,
    find_latest,
    is_complete,
    read_checkpoint,
    read_meta,
)
from cifar100.runfolder.rundir import Located, lock, unique_run_dir

# Besides the launch keys, the ways out of a diverged run that the non-finite-loss error suggests;
# changing them on a resume is allowed, with a warning that the run is no longer one experiment.
RECOVERY_KEYS = ("optim.lr", "train.clip_grad")


def locate(resume: str, log_dir: str, name: str) -> Located:
    """The run folder and checkpoint for `resume`; makes and locks the folder of a new or continued run."""
    if resume == "none":
        return Located(lock(unique_run_dir(log_dir, name)))
    if resume == "auto":
        run_dir = Path(log_dir) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        found = find_latest(lock(run_dir) / "checkpoints")
        return Located(run_dir, found[0], found[1:]) if found else Located(run_dir)
    path = Path(resume)
    is_run = (path / "checkpoints").is_dir()
    if not is_run and not is_complete(path):
        raise UserError(
            f"resume={resume}: not a checkpoint folder (expected model.safetensors and COMPLETE) "
            "nor a run folder with checkpoints/; use resume=auto to continue <log.dir>/<name>"
        )
    owner = path.resolve() if is_run else path.resolve().parent.parent
    mine = (Path(log_dir) / name).resolve() == owner
    if mine:
        lock(owner)
    if is_run:
        found = find_latest(path / "checkpoints")
        if not found:
            raise UserError(f"resume={resume}: no complete checkpoint under {path / 'checkpoints'}")
        checkpoint, read = found[0].resolve(), found[1:]
    else:
        checkpoint = path.resolve()
        if not checkpoint.name.startswith(PREFIX):
            raise UserError(
                f"resume={resume}: {checkpoint.name} holds weights only (the best epoch's, for eval); "
                f"resume from a {PREFIX}… checkpoint, or use resume=auto"
            )
        read = read_checkpoint(checkpoint)
    if not mine:
        return Located(None, checkpoint, read, fork_of=owner)
    newer = tuple(sorted(p for p in checkpoint.parent.glob(f"{PREFIX}*") if p.name > checkpoint.name))
    return Located(owner, checkpoint, read, newer)


def load(
    path: Path,
    config: dict[str, Any],
    read: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None] | None = None,
) -> Snapshot:
    """Load a step checkpoint (or take its already `read` weights, train state and averaged weights)
    and check that it belongs to this config."""
    meta = read_meta(path)
    mismatched = config_differences(meta.get("config", {}), config)
    recovery = [m for m in mismatched if m.split(":")[0] in RECOVERY_KEYS]
    mismatched = [m for m in mismatched if m not in recovery]
    if recovery:
        warnings.warn(
            f"resuming with {'; '.join(recovery)}: the run continues, but is no longer the "
            "uninterrupted run of one config",
            stacklevel=2,
        )
    if mismatched:
        shown = "; ".join(mismatched[:6]) + (" …" if len(mismatched) > 6 else "")
        raise UserError(
            f"{path}: checkpoint was made with another config ({shown}); "
            "resume with the same recipe and overrides, or start a new run"
        )
    weights, state, ema = read or read_checkpoint(path)
    return Snapshot(weights, state, meta, ema)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every training-relevant key that differs."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in set(a) | set(b) if not is_launch_key(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
