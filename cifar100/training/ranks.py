"""Decisions taken once, on the main process, and shared with every process of the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

T = TypeVar("T")


def main_decides(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """What `decide()` answers on the main process, on every process: the others do not call it (it
    may read the run folder, ask Slurm, or change what only the main process holds) and wait for
    its answer, which must be picklable. Every process must call this at the same point."""
    box = [decide() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    return box[0]  # type: ignore[return-value]  # the main process's answer, a T
