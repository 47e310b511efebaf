"""glibc's allocator told to keep the memory a process frees, at the start of every command.

A CPU training step allocates and frees the same large activation buffers every step. glibc serves
each buffer over 128 KiB-32 MiB with its own mmap and gives it back to the kernel on free (and trims
the heap's top past 128 KiB), so every step pays for fresh zeroed pages again: on this project's
2-core machine `recipe=cpu`'s step ran about 25 % faster with
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647` (BENCHMARKS.md).
`mallopt` sets the same two values from inside the process, before the run allocates its tensors,
so `python train.py`, `accelerate launch`, Slurm and the image all get them without a variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
KEEP_ALL = 2**31 - 1  # the largest trim threshold: the heap's top is never given back


def keep_freed_memory() -> bool:
    """Make glibc serve large allocations from its heap and never give freed memory back (the heap
    stays at the run's peak, which a training step reaches in its first few steps anyway). Nothing
    off glibc, where the user set glibc's malloc tunables (GLIBC_TUNABLES) themselves, or under an
    address-space limit (`ulimit -v`), which counts a kept heap, its holes included: there a large
    buffer needed after the step's peak (a checkpoint's serialised bytes) found no room to grow the
    heap, where glibc's own mappings came and went (`recipe=best`, `train.micro_batch=auto`, under
    `ulimit -v 6500000`). True when set."""
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_ALL))
