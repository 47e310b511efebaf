"""What a run's files must hold before anything uses them: meta.json, train states, metrics rows and
summary.json checked as data, not only as JSON.

Each check returns what is wrong, or None. The readers turn a problem into "unreadable": a
checkpoint is then skipped like a truncated one, a report leaves the run out with a note.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import torch

from cifar100.errors import clip, shown

# meta.json: the position and the run's totals, as TrainState.state_dict writes them.
POSITION = ("epoch", "step_in_epoch", "global_step")
TOTAL_COUNTS = ("epochs_done", "train_images")
TOTAL_SECONDS = ("train_seconds", "wall_seconds")
# Every metrics row holds these numbers (DESIGN's run folder contract); rows may hold more.
ROW_NUMBERS = ("lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5")
# summary.json: what a report reads, by the kind of value it must be.
SUMMARY_COUNTS = ("best_epoch", "epochs", "world_size", "parameters")
SUMMARY_TEXTS = ("precision", "device")
TEXT_CHARS = 200  # the longest text a report takes from summary.json (a device's name)
MOST_SECONDS = 1e9  # about 30 years: a run's wall time beyond it is not one
MOST_COUNT = 10**15  # far beyond any epoch, step, image or parameter count a run makes
MOST_LOSS = float(torch.finfo(torch.float32).max)  # a loss is computed in float32: beyond it, only infinity


def is_count(value: Any) -> TypeGuard[int]:
    """A whole number from 0 to `MOST_COUNT` (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MOST_COUNT


def is_number(value: Any) -> bool:
    """A float, or an int of at most `MOST_COUNT` (a bool is not one; a larger int would overflow
    a float); NaN counts, a diverged run logs it."""
    return isinstance(value, float) or (is_count(value) or is_count(-value) if isinstance(value, int) else False)


def is_share(value: Any) -> bool:
    """An accuracy: a number from 0 to 1."""
    return is_number(value) and 0 <= value <= 1


def is_amount(value: Any) -> bool:
    """A finite number >= 0 (a learning rate, seconds, images per second)."""
    return is_number(value) and math.isfinite(value) and value >= 0


def _value_problem(key: str, value: Any) -> str | None:
    """What is wrong with one number of a metrics row or summary, judged by its name."""
    key = clip(key)
    if not is_number(value):
        return f"{key} is {_kind(value)}, not a number"
    if key.endswith(("_top1", "_top5")) and not is_share(value):
        return f"{key} is {shown(value)}, not an accuracy from 0 to 1"
    if key.endswith("_loss"):  # NaN and infinity are what a diverged run logs
        plausible = math.isnan(value) or math.isinf(value) or 0 <= value <= MOST_LOSS
        return None if plausible else f"{key} is {shown(value)}, not a loss a run computes"
    if not is_amount(value):
        return f"{key} is {shown(value)}, not a finite number >= 0"
    return None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def meta_problem(meta: Any, resumable: bool = False) -> str | None:
    """What makes a checkpoint's meta.json unusable. `resumable`: a step checkpoint, which a resume
    needs the totals of."""
    if not isinstance(meta, dict):
        return f"expected an object, found {_kind(meta)}"
    for key in POSITION:
        if key in meta and not is_count(meta[key]):
            return f"{key} is {shown(meta[key])}, not a count"
    if "config" in meta and not isinstance(meta["config"], dict):
        return f"config is {_kind(meta['config'])}, not an object"
    if "best_score" in meta and not is_number(meta["best_score"]):
        return f"best_score is {shown(meta['best_score'])}, not a number"
    totals = meta.get("totals")
    if totals is None:
        return "no totals" if resumable else None
    if not isinstance(totals, dict):
        return f"totals is {_kind(totals)}, not an object"
    for key in TOTAL_COUNTS:
        if key in totals and not is_count(totals[key]):
            return f"totals.{key} is {shown(totals[key])}, not a count"
    for key in TOTAL_SECONDS:
        if key in totals and not (is_number(totals[key]) and math.isfinite(totals[key]) and totals[key] >= 0):
            return f"totals.{key} is {shown(totals[key])}, not a duration"
    per_rank = totals.get("images_per_rank", [])
    if not isinstance(per_rank, list) or not all(map(is_count, per_rank)):
        return f"totals.images_per_rank is {shown(per_rank)}, not a list of counts"
    if not isinstance(totals.get("wandb_id"), (str, type(None))):
        return f"totals.wandb_id is {shown(totals['wandb_id'])}, not a text"
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
    """What makes one metrics.jsonl row unusable; rows follow each other in increasing epochs, and
    every value is a number in the range of what it measures."""
    if not isinstance(row, dict):
        return f"expected an object, found {_kind(row)}"
    epoch = row.get("epoch")
    if not is_count(epoch) or epoch < 1:
        return f"epoch is {shown(epoch)}, not an epoch number"
    if epoch <= previous_epoch:
        return f"epoch {epoch} after epoch {previous_epoch}"
    missing = [k for k in ROW_NUMBERS if k not in row]
    if missing:
        return f"{', '.join(missing)} missing"
    return next((p for k, v in row.items() if k != "epoch" and (p := _value_problem(k, v))), None)


def summary_problem(summary: Any) -> str | None:
    """What makes a summary.json unusable for a report: every figure the report reads present and in
    the range of what it measures."""
    if not isinstance(summary, dict):
        return f"expected an object, found {_kind(summary)}"
    on, weights = summary.get("best_selected_on", "test"), summary.get("best_weights", "model")
    if on not in ("test", "val") or weights not in ("model", "ema"):
        return f"best_selected_on {shown(on)} or best_weights {shown(weights)} is not one the project writes"
    wanted = ["final_test_top1", "final_test_top5", "best_test_top1", "wall_seconds"]
    wanted += ["best_val_top1", "test_top1_at_best_val", "best_val_epoch"] if on == "val" else []
    if weights == "ema":
        wanted += ["ema_test_top1_at_best_ema_val", "best_ema_val_epoch"] if on == "val" else ["best_ema_test_top1"]
        wanted += ["best_ema_epoch"] if on == "test" else []
    wanted += [k for k in ("final_ema_test_top1",) if k in summary]
    missing = [k for k in (*wanted, *SUMMARY_COUNTS, *SUMMARY_TEXTS) if k not in summary]
    if missing:
        return f"{', '.join(missing)} missing"
    for key in SUMMARY_COUNTS + tuple(k for k in wanted if k.endswith("_epoch")):
        if not is_count(summary[key]) or (key == "world_size" and summary[key] < 1):
            return f"{key} is {shown(summary[key])}, not a count"
    for key in (k for k in wanted if not k.endswith("_epoch")):
        problem = _value_problem(key, summary[key])
        if problem or (key == "wall_seconds" and summary[key] > MOST_SECONDS):
            return problem or f"wall_seconds is {shown(summary[key])}, more than {MOST_SECONDS:g}"
    for key in SUMMARY_TEXTS:
        if not isinstance(summary[key], str) or len(summary[key]) > TEXT_CHARS:
            return f"{key} is {shown(summary[key])}, not a text of at most {TEXT_CHARS} characters"
    return None
