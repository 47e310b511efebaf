"""The out-of-memory lines of a training run: what it was doing (and at what batch, where a batch can be
cut), on what memory, the fix, and its last good checkpoint. memory.py turns the error into the line."""

from __future__ import annotations

import contextlib

import torch

from cifar100.config import TrainConfig
from cifar100.runfolder.checkpoint import CheckpointWriter
from cifar100.training import memory
from cifar100.training.runtime import device_type


def last_good(writer: CheckpointWriter | None, resume: str) -> str:
    """The last good checkpoint in words, every write ended: before the run folder opens (`writer` None),
    none, or the one `resume` named, as it was."""
    if writer is None:
        return "none yet" if resume == "none" else "as it was (this start wrote nothing)"
    with contextlib.suppress(Exception):  # a write that failed leaves the one before it the last good
        writer.wait()
    return str(writer.last_good or "none yet")


def while_setting_up(resume: str) -> str:
    """The line of a run whose data, model or optimizer did not fit."""
    return while_doing("setting up the data, model and optimizer", torch.device(device_type()), last_good(None, resume))


def while_doing(doing: str, device: torch.device, last: str) -> str:
    """The line of anything but a training step or an evaluation (whose own say more): no batch to cut."""
    return f"while {doing} on {memory.device_memory(device)}: {memory.FIX_ELSEWHERE}. Last good checkpoint: {last}"


def in_train_step(
    where: str, batch: int, micro: int | None, train: TrainConfig, device: torch.device, last: str
) -> str:
    """The line of a training step at `where`, of `batch` images per process in pieces of `micro`."""
    pieces = f" in micro-batches of {micro}" if micro and micro < batch else ""
    return (
        f"in the training step ({where}) with {batch} images per process{pieces} on {memory.device_memory(device)}: "
        f"{memory.fix_for_train(batch, micro, train.grad_accum, train.micro_batch)}. Last good checkpoint: {last}"
    )


def in_evaluation(where: str, batch: int, auto: bool, device: torch.device, last: str) -> str:
    """The line of an evaluation at `where` in batches of `batch` (`auto`: train.micro_batch=auto had
    halved them down to one image)."""
    return (
        f"in the evaluation of {where} with batches of {batch} images per process on "
        f"{memory.device_memory(device)}: {memory.fix_for_eval(batch, auto)}. Last good checkpoint: {last}"
    )
