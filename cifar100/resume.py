"""Which run folder and checkpoint a run continues from (`resume=none|auto|PATH`), and whether it may.

`auto` takes the newest checkpoint that loads under `<log.dir>/<name>/checkpoints/` (a fresh
start in that folder when there is none), so a requeued job can always pass it. A path names a
checkpoint folder or a run folder. A checkpoint made with another config is refused, naming
the keys that differ, except the launch keys (where data lives, worker counts, logging) and the
recovery keys a diverged run may need (with a warning).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar100.checkpoint import (
    PREFIX,
    Snapshot,
    find_latest,
    is_complete,
    load_ema,
    load_train_state,
    load_weights,
    read_meta,
)
from cifar100.config import flatten, is_launch_key
from cifar100.errors import UserError

# Besides the launch keys, the ways out of a diverged run that the non-finite-loss error suggests;
# changing them on a resume is allowed, with a warning that the run is no longer one experiment.
RECOVERY_KEYS = ("optim.lr", "train.clip_grad")


@dataclass(frozen=True)
class Located:
    """Where a run continues: its folder, the checkpoint (or None), and that checkpoint's weights,
    train state and averaged weights when finding it meant reading them (so they are not read twice)."""

    run_dir: Path
    checkpoint: Path | None = None
    read: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None] | None = None


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


def locate(resume: str, log_dir: str, name: str) -> Located:
    """The run folder and checkpoint for `resume`; creates the run folder when new."""
    if resume == "none":
        return Located(unique_run_dir(log_dir, name))
    if resume == "auto":
        run_dir = Path(log_dir) / name
        run_dir.mkdir(parents=True, exist_ok=True)
        found = find_latest(run_dir / "checkpoints")
        return Located(run_dir, found[0], found[1:]) if found else Located(run_dir)
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        found = find_latest(path / "checkpoints")
        if not found:
            raise UserError(f"resume={resume}: no complete checkpoint under {path / 'checkpoints'}")
        return Located(path, found[0], found[1:])
    if not is_complete(path):
        raise UserError(f"resume={resume}: not a checkpoint folder (expected model.safetensors and COMPLETE) "
                        "nor a run folder with checkpoints/; use resume=auto to continue <log.dir>/<name>")
    path = path.resolve()
    if not path.name.startswith(PREFIX):
        raise UserError(f"resume={resume}: {path.name} holds weights only (the best epoch's, for eval); resume from "
                        f"a {PREFIX}… checkpoint, or use resume=auto")
    newer = sorted(p for p in path.parent.glob(f"{PREFIX}*") if p.name > path.name)
    if newer:
        # Going back to an older checkpoint forks the run: keep the newer ones, but out of resume=auto's way.
        aside = unique_run_dir(path.parent / "abandoned", f"after-{path.name}")
        for p in newer:
            os.replace(p, aside / p.name)
        warnings.warn(f"resuming {path.name}: the newer {', '.join(p.name for p in newer)} moved to {aside}", stacklevel=2)
    return Located(path.parent.parent, path)


def load(path: Path, config: dict[str, Any],
         read: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None] | None = None) -> Snapshot:
    """Load a checkpoint (or take its already `read` weights, train state and averaged weights) and
    check that it belongs to this config."""
    meta = read_meta(path)
    mismatched = config_differences(meta.get("config", {}), config)
    recovery = [m for m in mismatched if m.split(":")[0] in RECOVERY_KEYS]
    mismatched = [m for m in mismatched if m not in recovery]
    if recovery:
        warnings.warn(f"resuming with {'; '.join(recovery)}: the run continues, but is no longer the "
                      "uninterrupted run of one config", stacklevel=2)
    if mismatched:
        shown = "; ".join(mismatched[:6]) + (" …" if len(mismatched) > 6 else "")
        raise UserError(f"{path}: checkpoint was made with another config ({shown}); "
                        "resume with the same recipe and overrides, or start a new run")
    weights, state, ema = read or (load_weights(path), load_train_state(path), load_ema(path))
    if "optimizer" not in state:
        raise UserError(f"{path}: holds weights only (the best epoch's, for eval); resume from a step-… "
                        "checkpoint, or use resume=auto")
    return Snapshot(weights, state, meta, ema)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every training-relevant key that differs."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in set(a) | set(b) if not is_launch_key(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
