"""What a run's files must hold before anything uses them: meta.json, train states, metrics rows and
summary.json checked as data, not only as JSON.

Each check returns what is wrong, or None. The readers turn a problem into "unreadable": a
checkpoint is then skipped like a truncated one, a report leaves the run out with a note.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import torch

# meta.json: the position and the run's totals, as TrainState.state_dict writes them.
POSITION = ("epoch", "step_in_epoch", "global_step")
TOTAL_COUNTS = ("epochs_done", "train_images")
TOTAL_SECONDS = ("train_seconds", "wall_seconds")
# Every metrics row holds these numbers (DESIGN's run folder contract); rows may hold more.
ROW_NUMBERS = ("lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5")
SUMMARY_NUMBERS = (
    "final_test_top1",
    "final_test_top5",
    "best_test_top1",
    "best_epoch",
    "epochs",
    "wall_seconds",
    "world_size",
    "parameters",
)
SUMMARY_TEXTS = ("precision", "device")
SUMMARY_VAL_NUMBERS = ("best_val_top1", "best_val_epoch", "test_top1_at_best_val")


def is_count(value: Any) -> TypeGuard[int]:
    """A whole number >= 0 (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: Any) -> bool:
    """An int or float (a bool is not one); NaN counts, a diverged run logs it."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def meta_problem(meta: Any, resumable: bool = False) -> str | None:
    """What makes a checkpoint's meta.json unusable. `resumable`: a step checkpoint, which a resume
    needs the totals of."""
    if not isinstance(meta, dict):
        return f"expected an object, found {_kind(meta)}"
    for key in POSITION:
        if key in meta and not is_count(meta[key]):
            return f"{key} is {meta[key]!r}, not a count"
    if "config" in meta and not isinstance(meta["config"], dict):
        return f"config is {_kind(meta['config'])}, not an object"
    if "best_score" in meta and not is_number(meta["best_score"]):
        return f"best_score is {meta['best_score']!r}, not a number"
    totals = meta.get("totals")
    if totals is None:
        return "no totals" if resumable else None
    if not isinstance(totals, dict):
        return f"totals is {_kind(totals)}, not an object"
    for key in TOTAL_COUNTS:
        if key in totals and not is_count(totals[key]):
            return f"totals.{key} is {totals[key]!r}, not a count"
    for key in TOTAL_SECONDS:
        if key in totals and not (is_number(totals[key]) and math.isfinite(totals[key]) and totals[key] >= 0):
            return f"totals.{key} is {totals[key]!r}, not a duration"
    per_rank = totals.get("images_per_rank", [])
    if not isinstance(per_rank, list) or not all(map(is_count, per_rank)):
        return f"totals.images_per_rank is {per_rank!r}, not a list of counts"
    if not isinstance(totals.get("wandb_id"), (str, type(None))):
        return f"totals.wandb_id is {totals['wandb_id']!r}, not a text"
    done, epoch = totals.get("epochs_done"), meta.get("epoch")
    if done is not None and epoch is not None and epoch not in (done, done + 1):
        return f"epoch {epoch} cannot follow {done} finished epochs"
    return None


def train_state_problem(state: Any, meta: dict) -> str | None:
    """What makes a step checkpoint's train state unusable for a resume."""
    if not isinstance(state, dict):
        return f"expected a dict, found {_kind(state)}"
    for key in ("optimizer", "schedule"):
        if not isinstance(state.get(key), dict):
            return f"{key} is {_kind(state.get(key))}, not a dict"
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        return "no per-rank state"
    for rank, mine in enumerate(ranks):
        if not isinstance(mine, dict) or not isinstance(mine.get("rng_cpu"), torch.Tensor):
            return f"rank {rank}'s state has no RNG state"
        if not isinstance(mine.get("progress"), (dict, type(None))):
            return f"rank {rank}'s progress is {_kind(mine.get('progress'))}"
    per_rank = meta["totals"].get("images_per_rank") or ranks
    if len(per_rank) != len(ranks):
        return f"{len(ranks)} ranks saved their state, but the totals count images of {len(per_rank)}"
    return None


def metrics_row_problem(row: Any, previous_epoch: int) -> str | None:
    """What makes one metrics.jsonl row unusable; rows follow each other in increasing epochs."""
    if not isinstance(row, dict):
        return f"expected an object, found {_kind(row)}"
    epoch = row.get("epoch")
    if not is_count(epoch) or epoch < 1:
        return f"epoch is {epoch!r}, not an epoch number"
    if epoch <= previous_epoch:
        return f"epoch {epoch} after epoch {previous_epoch}"
    missing = [k for k in ROW_NUMBERS if not is_number(row.get(k))]
    return f"{', '.join(missing)} not numbers" if missing else None


def summary_problem(summary: Any) -> str | None:
    """What makes a summary.json unusable for a report."""
    if not isinstance(summary, dict):
        return f"expected an object, found {_kind(summary)}"
    numbers = SUMMARY_NUMBERS + (SUMMARY_VAL_NUMBERS if summary.get("best_selected_on") == "val" else ())
    wrong = [k for k in numbers if not is_number(summary.get(k))]
    wrong += [k for k in SUMMARY_TEXTS if not isinstance(summary.get(k), str)]
    return f"{', '.join(wrong)} missing or of the wrong type" if wrong else None
