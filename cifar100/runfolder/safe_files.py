"""Reading and writing files without being led astray by what lies on disk: the one place through
which the run folder's files are read and written, and the commands write their `out=` files.

- Writes never go through a symbolic link: a file is built under a temporary name unique to its
  writer (`O_EXCL`, so a link or file planted at that name is never opened) and renamed into place,
  which replaces whatever is at the final name instead of writing through it. Nothing of anyone
  else is deleted: a writer removes only its own temporary file.
- A run folder's files belong to its run (and to `eval` and `export`, which write their own files
  there): a command's `out=` is refused when it lies inside a run folder.
- Reads take regular files only, up to a size bound: a FIFO, a device or a link to one is refused at
  once instead of hanging or filling memory.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

from cifar100.errors import UserError, clip

MiB = 2**20
GiB = 2**30
# The largest file each reader takes (docs/run-folder.md lists them). Each is far above what the
# project writes: a metrics row is about 500 bytes, a meta.json or config.yaml a few kB.
TEXT_BYTES = 16 * MiB  # config.yaml, summary.json, meta.json, an export's JSON
METRICS_BYTES = 64 * MiB  # metrics.jsonl: over 100,000 epochs of rows
WEIGHTS_BYTES = 16 * GiB  # model.safetensors, ema.safetensors, train_state.pt
MODEL_FILE_BYTES = 2 * GiB  # an exported .onnx or .pt2 (protobuf's own limit for ONNX)

# What marks a folder as a run's: its config, plus what only a run makes beside it.
RUN_MARKS = (".lock", "metrics.jsonl", "checkpoints")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def open_no_follow(path: Path, flags: int) -> int:
    """`os.open` for a file the project writes in place (a lock, metrics.jsonl's appends), never
    through a symbolic link (O_NOFOLLOW). A link or anything but a regular file is refused with one
    line (a FIFO at once: O_NONBLOCK)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENXIO):  # ENXIO: a FIFO that nothing reads
            raise
        what = "a symbolic link" if err.errno == errno.ELOOP else "a FIFO"
    else:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return fd
        os.close(fd)
        what = _kind(mode)
    raise UserError(
        f"{path}: {what}; the project never writes through one (nothing was written): remove it and run again"
    )


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (see `write_all_atomic`)."""
    write_all_atomic({path: data})


def write_all_atomic(files: dict[Path, bytes]) -> None:
    """Write every file through a temporary file of its own, then rename them all into place, so a
    reader never sees half a file and a failed write (a full disk) leaves every old file as it was.
    Each temporary name is unique to this writer and made with O_EXCL: two writers never share one,
    and a link planted beside a file is never followed; a link at the final name is replaced by the
    file. Only this writer's temporary files are ever removed."""
    temps: dict[Path, str] = {}
    try:
        for path, data in files.items():
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def link_atomic(path: Path, target: str) -> None:
    """Make `path` a symbolic link to `target`, swapped in with a rename (never absent), built under a
    temporary name unique to this writer (`symlink` never follows what is there: it fails instead)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            tmp.symlink_to(target)
            break
        except FileExistsError:
            continue
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(folder: Path, what: str) -> None:
    """Refuse, before any long work, a folder that cannot take files: a probe of this writer's own
    (a unique name, removed again) is made in it."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{what}: cannot write there ({err.strerror or err})") from None


def make_folders(base: Path, *names: str) -> Path:
    """`base/names[0]/names[1]/...`, each made when missing; a part that is a symbolic link (or not a
    folder) is refused, so that no file written below lands outside `base`."""
    folder = base
    for name in names:
        folder = folder / name
        try:
            folder.mkdir(exist_ok=True)
        except FileExistsError:
            pass  # a file or a dangling link: named below
        mode = os.lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else _kind(mode)
            raise UserError(f"{folder}: {what}, not a folder; nothing is written through one: remove it and run again")
    return folder


def run_folder_of(path: Path) -> Path | None:
    """The run folder that `path` lies in (its own folder or any above), the links to its folder
    resolved (a link at `path` itself is replaced by a write, never followed); None outside any."""
    for folder in (Path(os.path.realpath(path.parent)) / path.name).parents:
        if (folder / "config.yaml").is_file() and any(os.path.lexists(folder / m) for m in RUN_MARKS):
            return folder
    return None


def refuse_run_folder(path: Path, what: str) -> None:
    """Refuse `what` (a command's `out=`) when `path` lies inside a run folder: those files are the
    run's (and eval's and export's), and one written over cannot be had back."""
    run = run_folder_of(path)
    if run is not None:
        shown = os.path.relpath(run)
        raise UserError(
            f"{what}: inside the run folder {run if shown.startswith('..') else shown}, whose files belong to its "
            "run; nothing was written: give a place outside run folders"
        )


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, a regular file (links followed) of at most `limit` bytes; anything else is
    one line naming it: a FIFO or a device is refused before it is read, so nothing hangs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        _check_regular(path, info, limit, what)
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(info.st_size + 1)  # no more than the file holds: a buffer of `limit` may not fit
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if len(data) > info.st_size:
        raise UserError(f"{path}: grew while it was read; the {what} is not read: run again once it is written")
    return data


def read_text(path: Path, limit: int, what: str) -> str:
    """`read_bounded`, decoded as UTF-8 (a file that is not is one line naming it)."""
    try:
        return read_bounded(path, limit, what).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}), not a {what}") from None


def read_json(path: Path, limit: int, what: str) -> Any:
    """`read_text`, parsed as JSON (invalid JSON, nesting too deep for Python's parser or a number of
    thousands of digits is one line naming the file)."""
    text = read_text(path, limit, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError, as is a 5,000-digit number
        raise UserError(f"{path}: not a {what}, not JSON ({clip(str(err) or type(err).__name__)})") from None


def require_regular(path: Path, limit: int, what: str) -> None:
    """Refuse, in one line, a file a library will open by its path (weights, a train state, a
    config) unless it is a regular file (links followed) of at most `limit` bytes."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    _check_regular(path, info, limit, what)


def _check_regular(path: Path, info: os.stat_result, limit: int, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: {_kind(info.st_mode)}, not a {what}; it is not read")
    if info.st_size > limit:
        raise UserError(
            f"{path}: {info.st_size / MiB:,.0f} MiB, more than the {_size(limit)} a {what} may hold; it is not read"
        )
