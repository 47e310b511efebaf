"""Fitting a run into its device's memory: an out of memory as one line that says how to fit, and
the largest micro-batch that fits (`train.micro_batch=auto`), found by trying the real step.

Micro-batches change how a process computes its step, not the step: the global batch, the
schedule and the images per optimizer step stay the recipe's, and each micro-batch's loss is
weighted by its share of the process's batch, so the summed gradient is the whole batch's mean.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils.memory import should_reduce_batch_size
from torch import nn

from cifar100.data.mixing import soft_target_cross_entropy
from cifar100.errors import UserError

GIB = 2**30
# Held free during a trial step for what the run allocates later and the trial does not: on a CPU the
# plots, the checkpoint writer's thread, the loader and the batch's own copies (about 250 MiB of
# address space measured here after a trial at a small batch; 256 MiB let a 3-piece choice fail in
# epoch 2 of tests/test_memory.py's run); on a GPU the caching allocator's fragmentation and cuDNN's
# workspaces.
CPU_HEADROOM = 384 * 2**20
GPU_HEADROOM_SHARE = 0.05


# How a CPU step reports a failed allocation besides PyTorch's own allocator (which Accelerate's
# should_reduce_batch_size knows): oneDNN, whose convolutions allocate their own scratch memory (seen
# here under `ulimit -v`), C++'s operator new, and Python when a thread's stack cannot be mapped (under
# `ulimit -v`, the checkpoint writer's thread started after a step that filled the limit).
_CPU_ALLOCATION_FAILURES = ("could not create a primitive", "std::bad_alloc", "can't start new thread")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, a CPU allocation that failed, or Python's MemoryError."""
    if isinstance(err, MemoryError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    return should_reduce_batch_size(err) or any(text in str(err) for text in _CPU_ALLOCATION_FAILURES)


def free_memory() -> None:
    """Give back what a failed step held (its tensors die with the traceback's frames)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_limit(device: torch.device) -> tuple[int, str]:
    """The bytes the run may use and what sets them: a GPU's total, else whichever binds of this
    process's address-space limit (`ulimit -v`), its cgroup's limit and the machine's memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, props.name
    limits = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "address space limited by ulimit -v"))
    cgroup = Path("/sys/fs/cgroup/memory.max")
    text = cgroup.read_text().strip() if cgroup.is_file() else "max"
    if text.isdigit():
        limits.append((int(text), "memory limited by its cgroup"))
    total = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line), 0)
    limits.append((int(total) * 1024, "memory"))
    return min(limits)


def device_memory(device: torch.device) -> str:
    """The memory the run may use, in words (see memory_limit)."""
    size, what = memory_limit(device)
    return f"{what} with {size / GIB:.1f} GiB" if device.type == "cuda" else f"cpu, {size / GIB:.1f} GiB of {what}"


@contextmanager
def out_of_memory_is_one_line(describe: Callable[[], str]) -> Iterator[None]:
    """Turn an out of memory inside into a UserError of one line: `describe()`, called once the
    failed step's memory is free, says where, with what batch, and how to fit."""
    try:
        yield
    except BaseException as err:
        if not is_out_of_memory(err):
            raise
        traceback.clear_frames(err.__traceback__)  # the frames hold the step's tensors
        free_memory()
        raise UserError(f"out of memory {describe()}") from None


def fix_for_train(batch: int, micro: int | None, grad_accum: int, asked: int | str | None = None) -> str:
    """What keeps the recipe's global batch and fits a smaller step, for a process's `batch` images
    per micro-step trained `micro` at a time (None: without train.micro_batch), where the user
    asked for `asked` (train.micro_batch): never what they already set."""
    if micro == 1:
        return "not even one image at a time fits: give the process more memory, or choose a smaller model.name"
    if micro:
        auto = "" if asked == "auto" else " (or auto, to find the largest that fits)"
        return f"set train.micro_batch={max(1, micro // 2)}{auto}: the recipe's global batch stays"
    accum = f"train.grad_accum={grad_accum * 2} or " if batch % 2 == 0 else ""
    return (
        f"set {accum}train.micro_batch=auto (the largest micro-batch that fits, found by trying the step): "
        "both keep the recipe's global batch and learning rate"
    )


def fix_for_eval(batch: int, auto: bool = False) -> str:
    """What fits an evaluation of `batch` images at a time and scores the same (`auto`: the user set
    train.micro_batch=auto already)."""
    if batch == 1:
        return "not even one image's evaluation fits: give the process more memory, or choose a smaller model.name"
    also = "" if auto else ", or train.micro_batch=auto, which halves it until it fits"
    return f"set data.eval_batch_size={max(1, batch // 2)} (evaluation is exact at any batch){also}"


FIX_ELSEWHERE = "give the process more memory, or choose a smaller model.name"  # model, checkpoint: no batch to cut


def optimizer_state_slots(optimizer: torch.optim.Optimizer) -> int:
    """How many tensors the size of a parameter the optimizer keeps per parameter (SGD with momentum
    1, Adam 2), learnt from one step of its twin on a probe parameter."""
    base = getattr(optimizer, "optimizer", optimizer)
    device = next((p.device for group in base.param_groups for p in group["params"]), torch.device("cpu"))
    probe = torch.zeros(3, device=device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    twin = type(base)([probe], **base.defaults)
    twin.step()
    return sum(torch.is_tensor(v) and v.shape == probe.shape for v in twin.state[probe].values())


@contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """Whatever a trial forward and backward do, leave the weights' gradients, the norm layers'
    running statistics and the random generators as they were (the trial takes no optimizer step)."""
    buffers = [b.detach().clone() for b in module.buffers()]
    grads = [p.grad for p in module.parameters()]
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for param, grad in zip(module.parameters(), grads):
            param.grad = grad
        with torch.no_grad():
            for buffer, saved in zip(module.buffers(), buffers):
                buffer.copy_(saved)
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state_all(rng_cuda)


def headroom(device: torch.device) -> int:
    """Bytes a trial step leaves free on `device` for what it does not try (see CPU_HEADROOM)."""
    if device.type == "cuda":
        return int(GPU_HEADROOM_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return CPU_HEADROOM


def _fits(attempt: Callable[[], None], device: torch.device) -> bool:
    """True when `attempt()` runs without running out of memory; what it held is freed either way. On
    a CPU it runs in a copy of this process (`_fits_in_a_copy`)."""
    if device.type == "cpu" and hasattr(os, "fork"):
        return _fits_in_a_copy(attempt)
    try:
        attempt()
        return True
    except BaseException as err:
        if not is_out_of_memory(err):
            raise
        traceback.clear_frames(err.__traceback__)
        return False
    finally:
        free_memory()


def _fits_in_a_copy(attempt: Callable[[], None]) -> bool:
    """`attempt()` in a forked copy of this process, which then exits. The copy has this process's
    memory, limits and allocator settings (those training allocates with), and nothing
    a trial leaves behind stays in the run: under `ulimit -v`, once one size had failed in the run's
    own process every smaller one failed too ("could not create a primitive": oneDNN's state from the
    failed size), and a size found that way failed again in the real step. The copy runs one thread
    (GNU OpenMP's thread pool does not survive a fork). A copy that dies (a crash, the kernel's
    out-of-memory killer) did not fit; any other error is raised here."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns of forking a threaded process: the copy takes no lock another thread may
        # hold (it computes on one thread and exits without cleanup).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the copy: its exit status is the answer (0 fits, 1 out of memory, 2 another error)
        os.close(read)
        status = 2
        try:
            torch.set_num_threads(1)
            attempt()
            status = 0
        except BaseException as err:
            status = 1 if is_out_of_memory(err) else 2
            if status == 2:
                os.write(write, f"{type(err).__name__}: {err}".encode()[:4000])
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        raise RuntimeError(f"a micro-batch trial failed: {said}")
    return code == 0


def _trial_images(size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    """`size` blank images: an evaluation's cost does not depend on what they show."""
    images = torch.zeros(size, 3, 32, 32, device=device)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters: the size of one copy of the weights, or of each optimizer slot."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def held_beside(
    module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *, ema: bool, processes: int
) -> int:
    """Bytes a run holds during its steps and evaluations that neither trial makes: on a CPU the copy
    a checkpoint keeps while it is written in the background (weights, the optimizer's state, the
    averaged weights) and the bytes the write serialises each file into (the optimizer's state through
    a growing buffer, briefly twice its size: without them `recipe=best` under `ulimit -v 6500000`
    ran out of memory in the step beside epoch 1's write); under DDP its gradient buckets (one copy of
    the gradients)."""
    size, slots = parameter_bytes(module), optimizer_state_slots(optimizer)
    checkpoint = (1 + slots + ema + 2 * max(1, slots)) * size if device.type == "cpu" else 0
    return checkpoint + (size if processes > 1 else 0)


def step_fits(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    size: int,
    batch: tuple[torch.Tensor, torch.Tensor],
    channels_last: bool,
    held: int = 0,
) -> bool:
    """Whether the training step fits in micro-batches of `size`, tried for real on `module` (the
    unwrapped model: no collective runs, so a rank that fails cannot stall the others): `batch`
    (one process's images and soft targets, as the pipeline and the mixer give them) in its first
    two pieces, forward and backward, the second's gradients added to the first's as the step adds
    them, then the optimizer's own step (its state and its temporaries), with `held` bytes (see
    held_beside) and `headroom` held free. The weights, the optimizer's state, the gradients, the
    norm statistics and the random generators are put back afterwards."""
    device = accelerator.device
    base = getattr(optimizer, "optimizer", optimizer)
    images, targets = batch
    params = list(module.parameters())
    # The weights and the optimizer's state as they were, to put back after the trial's step; on a CPU
    # the weights' copy stands for the checkpoint's in `held`. Copied inside the trial: they cost memory.
    saved: dict = {}
    free = headroom(device) + max(0, held - (parameter_bytes(module) if device.type == "cpu" else 0))

    def attempt() -> None:
        saved["state"] = _host_copy(base.state_dict()) if base.state else None
        saved["weights"] = [p.detach().to("cpu", copy=True) for p in params]
        reserve = torch.empty(free, dtype=torch.uint8, device=device)
        module.train()
        for x, t in list(zip(images.split(size), targets.split(size)))[:2]:
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with accelerator.autocast():
                logits = module(x).float()
            soft_target_cross_entropy(logits, t).backward()
            del logits
        saved["stepped"] = True  # from here on the weights and the state may have changed
        base.step()
        del reserve  # held until the step's end

    try:
        with untouched(module):
            return _fits(attempt, device)
    finally:
        if saved.get("stepped"):
            _put_back(params, base, saved["weights"], saved["state"])
        saved.clear()
        free_memory()


def _put_back(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, weights: list, state: dict | None) -> None:
    """The weights and the optimizer's state as a trial found them (`state` None: it had none yet)."""
    with torch.no_grad():
        for param, weight in zip(params, weights):
            param.copy_(weight)
    if state is None:
        optimizer.state.clear()
    else:
        optimizer.load_state_dict(state)


def _host_copy(tree: dict) -> dict:
    """`tree` (an optimizer's state dict) with its tensors copied to the CPU."""
    return torch.utils._pytree.tree_map(lambda v: v.to("cpu", copy=True) if torch.is_tensor(v) else v, tree)


def eval_fits(
    module: nn.Module, accelerator: Accelerator, size: int, channels_last: bool, flip: bool, held: int = 0
) -> bool:
    """Whether an evaluation batch of `size` images fits: one forward (two with the flip) in eval
    mode without gradients on the unwrapped `module`, with `held` bytes (what training holds by then
    that is not made yet: the optimizer's state, see held_beside) and `headroom` held free."""
    device = accelerator.device

    def attempt() -> None:
        with untouched(module), torch.no_grad():
            reserve = torch.empty(held + headroom(device), dtype=torch.uint8, device=device)  # noqa: F841 (held through the trial)
            images = _trial_images(size, device, channels_last)
            module.eval()
            try:
                with accelerator.autocast():
                    logits = module(images).float()
                    if flip:
                        logits = logits + module(images.flip(3)).float()
            finally:
                module.train()

    return _fits(attempt, device)


def largest_halving(batch: int, fits: Callable[[int], bool]) -> int | None:
    """`batch`, halved until it `fits` (agreed by the caller across ranks); None when 1 does not."""
    while not fits(batch):
        if batch == 1:
            return None
        batch //= 2
    return batch


def largest_fitting(batch: int, fits: Callable[[int], bool]) -> int | None:
    """The largest micro-batch for a process's `batch` images that `fits`, in the fewest pieces:
    the pieces double until one fits, then a bisection finds the fewest; None when not even one
    image fits. `fits` must give every rank the same answer (the caller agrees them)."""
    pieces, failed = 1, 0
    while not fits(math.ceil(batch / pieces)):
        if pieces >= batch:
            return None
        failed, pieces = pieces, min(batch, pieces * 2)
    while pieces - failed > 1:
        middle = (failed + pieces) // 2
        size = math.ceil(batch / middle)
        if size == math.ceil(batch / pieces) or (size != math.ceil(batch / max(failed, 1)) and fits(size)):
            pieces = middle  # a size already known to fit, or one that fits
        else:
            failed = middle  # a size already known not to fit, or one that does not
    return math.ceil(batch / pieces)


def agreed(accelerator: Accelerator, ok: bool) -> bool:
    """True when `ok` on every rank."""
    flags = accelerator.gather(torch.tensor([float(ok)], device=accelerator.device))
    return bool(flags.min().item() > 0)


def agreed_min(accelerator: Accelerator, value: int) -> int:
    """The smallest `value` of all ranks."""
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).min().item())
