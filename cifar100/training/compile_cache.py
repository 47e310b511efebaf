"""torch.compile after a process was killed while compiling.

Inductor writes each compiled kernel library (`.so`, and `.o` parts) straight to its final name in
a cache shared by every process of the user (`$TORCHINDUCTOR_CACHE_DIR`, default
`/tmp/torchinductor_<user>`), under a lock, and later processes reuse any file that exists. A
process killed while the compiler writes (preemption, `kill -9`, a `timeout`) leaves a torn file,
and from then on every run that compiles the same kernel fails with "file too short" or "cannot
read file data". Before compiling, the torn files whose lock nobody holds are removed, so torch
builds them again; a file being written now keeps its lock and is left alone.
"""

from __future__ import annotations

import getpass
import os
import struct
import tempfile
from pathlib import Path

import torch
from filelock import FileLock, Timeout

LIBRARY_SUFFIXES = (".so", ".o")


def cache_root() -> Path:
    """Inductor's cache folder, found as torch finds it (without torch's side effect of setting
    TORCHINDUCTOR_CACHE_DIR in this process's environment)."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen:
        return Path(chosen).absolute()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return Path(tempfile.gettempdir()) / f"torchinductor_{user}"


def is_torn(path: Path) -> bool:
    """True when an ELF file ends before its section header table does (a linker writes that
    table last, so a file cut short anywhere lacks it), or is not ELF at all."""
    try:
        with path.open("rb") as f:
            header = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return False
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:  # ELF64 only: what inductor builds here
        return True
    order = "<" if header[5] == 1 else ">"
    (section_offset,) = struct.unpack_from(order + "Q", header, 0x28)
    entry_size, entries = struct.unpack_from(order + "HH", header, 0x3A)
    return size < section_offset + entry_size * entries


def drop_torn_libraries(root: Path) -> list[Path]:
    """Remove the torn kernel libraries under `root` (inductor's cache) that no process is writing
    now, each checked again under its lock (the one torch takes to build it); return them."""
    locks = root / "locks"
    dropped = []
    for path in sorted(root.glob("??/*")):
        if not path.name.endswith(LIBRARY_SUFFIXES) or not is_torn(path):
            continue
        key = path.name.split(".", 1)[0]
        locks.mkdir(exist_ok=True)
        try:
            with FileLock(str(locks / f"{key}.lock"), timeout=0):
                if is_torn(path):
                    path.unlink(missing_ok=True)
                    dropped.append(path)
        except Timeout:
            continue  # being built by another process right now
    return dropped


def compiled(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """`torch.compile(model, mode=...)`, with torn libraries left by killed processes cleared first."""
    root = cache_root()
    if root.is_dir():
        drop_torn_libraries(root)
    # torch's stubs say compile returns a Callable; given a Module it returns one (an OptimizedModule).
    return torch.compile(model, mode=mode)  # type: ignore[return-value]
