"""A launch is one job: processes that a launcher started together must have joined one group."""

from __future__ import annotations

from cifar100.errors import UserError


def require_one_job(launched: str | None, joined: int) -> None:
    """Refuse a run whose launcher started `launched` processes (its WORLD_SIZE) that did not join
    one process group (`joined`, the Accelerator's process count): each would train alone, into a
    folder of its own. Accelerate falls back to single processes where CUDA is unavailable, e.g.
    `accelerate launch --multi_gpu` on a CPU machine or a GPU node whose driver failed."""
    try:
        world = int(launched or 1)
    except ValueError:
        return  # not a launcher's value; Accelerate reports what it makes of it
    if world > 1 and joined != world:
        raise UserError(f"the launcher started {world} processes (WORLD_SIZE={world}) but they did not join one job: "
                        f"each would train alone ({joined} process(es) in its group), as Accelerate does where CUDA "
                        "is unavailable. For CPU processes set ACCELERATE_USE_CPU=1; on GPU nodes check the driver "
                        "(nvidia-smi)")
