"""Which run folder and checkpoint a run continues from (`resume=none|auto|PATH`), and whether it may.

`auto` takes the newest checkpoint that loads under `<log.dir>/<name>/checkpoints/` (a fresh
start in that folder when there is none), so a requeued job can always pass it. A path names a
checkpoint folder or a run folder: its run is continued when `<log.dir>/<name>` is that run's
folder, and forked into a new folder otherwise (see `rundir.adopt`). A checkpoint made with
another config is refused, naming the keys that differ, except the launch keys (where data lives,
worker counts, logging), the recovery keys a diverged run may need (with a warning) and, between
WSD runs, the length and the cooldown (LENGTH_KEYS).

`start_point` changes no file of any run: it makes and locks the folder of a new or continued run,
reads the checkpoint and checks it; everything else waits until the checkpoint has loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from cifar100.config import flatten, is_launch_key
from cifar100.errors import UserError, clip
from cifar100.runfolder.checkpoint import (
    PREFIX,
    Snapshot,
    find_latest,
    is_complete,
    read_checkpoint,
    read_meta,
)
from cifar100.runfolder.rundir import Located, fork_history, lock, run_of, unique_run_dir
from cifar100.runfolder.tracking import read_metrics

# Besides the launch keys, the ways out of a diverged run that the non-finite-loss error suggests;
# changing them on a resume is allowed, with a warning that the run is no longer one experiment.
RECOVERY_KEYS = ("optim.lr", "train.clip_grad")
# A WSD run's length and cooldown may change on a resume or a fork: its rate up to the checkpoint does
# not depend on them, so a run lengthened from a checkpoint goes on exactly as one run of the new
# length, and a cooldown can branch off the constant rate at any step (what `cifar100 tune` does).
LENGTH_KEYS = ("train.steps", "train.epochs", "sched.cooldown")


def start_point(resume: str, log_dir: str, name: str) -> Located:
    """The run folder and checkpoint for `resume`; makes and locks the folder of a new or continued run."""
    if resume == "none":
        return Located(lock(unique_run_dir(log_dir, name)))
    if resume == "auto":
        return _newest_in(Path(log_dir) / name)
    path = Path(resume)
    is_run = (path / "checkpoints").is_dir()
    if not is_run and not is_complete(path):
        raise UserError(
            f"resume={clip(resume)}: not a checkpoint folder (expected model.safetensors and COMPLETE) "
            "nor a run folder with checkpoints/; use resume=auto to continue <log.dir>/<name>"
        )
    owner = path.resolve() if is_run else run_of(path.resolve())
    mine = owner == (Path(log_dir) / name).resolve()
    if not is_run and owner is not None and mine and path.resolve().parent != owner / "checkpoints":
        raise UserError(
            f"resume={clip(resume)}: a checkpoint set aside when this run went back to an older one; "
            "continuing this run from it would mix two histories: fork it into a new folder with another name="
        )
    if owner is not None and mine:
        lock(owner)
    if is_run:
        found = find_latest(path / "checkpoints")
        if not found:
            raise UserError(f"resume={clip(resume)}: no complete checkpoint under {path / 'checkpoints'}")
        checkpoint, read = found[0].resolve(), found[1:]
    else:
        checkpoint = path.resolve()
        if not checkpoint.name.startswith(PREFIX):
            raise UserError(
                f"resume={clip(resume)}: {checkpoint.name} holds weights only (the best epoch's, for eval); "
                f"resume from a {PREFIX}… checkpoint, or use resume=auto"
            )
        read = read_checkpoint(checkpoint)
    if not mine:
        _check_fork_history(resume, checkpoint, owner)
        return Located(None, checkpoint, read, fork_of=owner)
    newer = tuple(sorted(p for p in checkpoint.parent.glob(f"{PREFIX}*") if p.name > checkpoint.name))
    return Located(owner, checkpoint, read, newer)


def _newest_in(run_dir: Path) -> Located:
    """resume=auto: the newest checkpoint of `run_dir` that loads, or a fresh start there when the
    folder holds no history a fresh start would destroy."""
    run_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    found = find_latest(lock(run_dir) / "checkpoints", skipped)
    if found:
        for note in skipped:
            warnings.warn(f"skipping checkpoint {note}", stacklevel=3)
        return Located(run_dir, found[0], found[1:])
    history = _history(run_dir)
    if history:
        # Starting over here would empty metrics.jsonl and overwrite the best weights.
        unreadable = "; ".join(skipped[:3]) + (" …" if len(skipped) > 3 else "") or "checkpoints/ holds none"
        raise UserError(
            f"{run_dir} holds {history}, but no checkpoint of it loads ({unreadable}); nothing was changed: "
            "continue from a checkpoint that loads with resume=PATH, or start anew in a new folder with "
            "resume=none (or another name=)"
        )
    return Located(run_dir)


def _history(run_dir: Path) -> str:
    """What of a run's history a fresh start in `run_dir` would destroy ("" when nothing)."""
    try:
        epochs = len(read_metrics(run_dir / "metrics.jsonl"))
        rows = f"{epochs} epoch(s) of metrics.jsonl" if epochs else ""
    except UserError:
        rows = "an unreadable metrics.jsonl"  # unreadable rows are history too
    found = [
        rows,
        "summary.json" if (run_dir / "summary.json").exists() else "",
        "best weights" if (run_dir / "checkpoints" / "best").exists() else "",
    ]
    return ", ".join(f for f in found if f)


def _check_fork_history(resume: str, checkpoint: Path, owner: Path | None) -> None:
    """A fork continues its source's history: refuse, before any folder is made, one whose metrics
    rows of the epochs its checkpoint has done are not kept."""
    done = read_meta(checkpoint)["totals"].get("epochs_done", 0)
    history = fork_history(checkpoint, owner) if owner is not None else None
    kept = [r["epoch"] for r in read_metrics(history) if r["epoch"] <= done] if history else []
    if kept != list(range(1, done + 1)):
        where = history or f"{checkpoint} (in no run folder's checkpoints/)"
        raise UserError(
            f"resume={clip(resume)}: a fork copies the metrics of the {done} epoch(s) its checkpoint has done, "
            f"but {where} holds {len(kept)} of them; nothing was made: fork a checkpoint of a run folder that "
            "holds them, or start anew with resume=none"
        )


def load(
    path: Path,
    config: dict[str, Any],
    read: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None] | None = None,
) -> Snapshot:
    """Load a step checkpoint (or take its already `read` weights, train state and averaged weights)
    and check that it belongs to this config."""
    meta = read_meta(path)
    mismatched = config_differences(meta.get("config", {}), config)
    if config.get("sched", {}).get("name") == "wsd" and meta.get("config", {}).get("sched", {}).get("name") == "wsd":
        mismatched = [m for m in mismatched if m.split(":")[0] not in LENGTH_KEYS]
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
