"""Where and how the arithmetic runs: the device type, the precision that really runs there,
whether the processes a launcher started form one job, and each command's own process-wide state."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState

from cifar100.config import Config, DataConfig
from cifar100.errors import UserError

REFUSAL_GRACE_SECONDS = 10.0  # a refused launch: how long ranks other than 0 wait before they exit


@contextmanager
def fresh_process_state() -> Iterator[None]:
    """One command's use of what a process holds once: Accelerate's state (its precision, its gradient
    accumulation; one per process, and a second Accelerator with another precision is refused) starts
    empty and is emptied again after, and torch's CPU thread count and cuDNN autotuner flag are put
    back, so that a command called again from the same Python process, in any order, starts as it
    would in a fresh one."""
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    release_accelerate()
    try:
        yield
    finally:
        release_accelerate()
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark


def release_accelerate() -> None:
    """Empty Accelerate's process-wide state, so that the next Accelerator may take another precision."""
    # Accelerate's own tests reset its singletons this way; the process group, where one was made,
    # outlives them (Accelerator.end_training destroys it).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def device_type() -> str:
    """ "cuda" when a GPU is usable, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(kind: str) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if kind == "cuda" else "cpu"


def resolve_precision(requested: str, kind: str) -> str:
    """The precision that will really run: fp16/bf16 fall back to fp32 (with a warning) where unsupported."""
    if requested == "no":
        return "no"
    if kind == "cuda":
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            warnings.warn("bf16 is not supported on this GPU; training in fp32", stacklevel=2)
            return "no"
        return requested
    warnings.warn(
        f"train.precision={requested} has no fast path on {kind}; training in fp32 "
        "(set train.precision=no to silence this)",
        stacklevel=2,
    )
    return "no"


def require_one_job(launched: str | None, rank: str | None, joined: int, grace: float = REFUSAL_GRACE_SECONDS) -> None:
    """Refuse a run whose launcher started `launched` processes (its WORLD_SIZE) that did not join
    one process group (`joined`, the Accelerator's process count): each would train alone, into a
    folder of its own. Accelerate falls back to single processes where CUDA is unavailable, e.g.
    `accelerate launch --multi_gpu` on a CPU machine or a GPU node whose driver failed. A process
    whose launcher `rank` is not 0 waits `grace` s before it raises, so that rank 0 says why first:
    the launcher ends the others once one process has exited."""
    try:
        world = int(launched or 1)
    except ValueError:
        return  # not a launcher's value; Accelerate reports what it makes of it
    if world > 1 and joined != world:
        if rank not in (None, "0"):
            time.sleep(grace)
        raise UserError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but they did not join one job: "
            f"each would train alone ({joined} process(es) in its group), as Accelerate does where CUDA "
            "is unavailable. For CPU processes set ACCELERATE_USE_CPU=1; on GPU nodes check the driver "
            "(nvidia-smi)"
        )


def make_accelerator(cfg: Config, precision: str) -> Accelerator:
    """The run's Accelerator at `precision`, refused in one line where the processes a launcher started
    do not form one job."""
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="wandb" if cfg.log.wandb.mode != "disabled" else None,
        # non_blocking: copies from the pinned batches never make the host wait for the GPU.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
    )
    require_one_job(os.environ.get("WORLD_SIZE"), os.environ.get("RANK"), accelerator.num_processes)
    return accelerator


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or Slurm's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def capped_workers(data: DataConfig, say: Callable[[str], None] | None) -> DataConfig:
    """`data` with at most one loader worker per usable core: more only queue for the same cores.
    `say` (the main process's print, or None) tells the user once when the count was lowered."""
    cores = usable_cores()
    if data.pipeline != "reference" or data.workers <= cores:
        return data
    if say is not None:
        say(f"data.workers={data.workers} lowered to {cores}: this process may use {cores} CPU core(s)")
    return dataclasses.replace(data, workers=cores)
