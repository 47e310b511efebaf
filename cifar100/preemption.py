"""Stopping cleanly when the cluster or the user asks: SIGTERM, SIGUSR1, SIGINT or SIGHUP only raise a flag.

The training loop reads the flag at the next step boundary, all ranks agree on it, one
checkpoint is written and the process exits: 143 after SIGTERM or SIGUSR1 (`PREEMPTED_EXIT`,
the status the Slurm scripts requeue on), 130 after SIGINT (Ctrl-C), 129 after SIGHUP (the
terminal that started the run was closed). A second signal (later
than a duplicate copy of the first) means "now": the process exits at once.

Real systems signal every process of a job (Slurm's scancel and time limit, GNU timeout, a
terminal's Ctrl-C, `kill -- -PGID`), loader workers included. Workers leave the decision to the
main process (`quiet_worker`): they ignore these signals and end when the main process shuts
them down or dies.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a shell reports for a job stopped by SIGTERM
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports for Ctrl-C
HANGUP_EXIT = 129  # 128 + SIGHUP: what a shell reports for a job whose terminal went away
# A launcher that forwards the signal it got to a worker that got it from the process group too
# delivers two copies within milliseconds: only a signal after this many seconds means "now".
REPEAT_AFTER_S = 0.5
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
# What signal.signal takes and returns: a function, SIG_DFL / SIG_IGN, or None (set outside Python).
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def exit_status(signum: int | None) -> int:
    """The status a run stopped by `signum` exits with: 130 for SIGINT, 129 for SIGHUP, else 143."""
    statuses: dict[int | None, int] = {signal.SIGINT: INTERRUPTED_EXIT, signal.SIGHUP: HANGUP_EXIT}
    return statuses.get(signum, PREEMPTED_EXIT)


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI exits with `status`."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.status = exit_status(signum)


def quiet_worker(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: ignore the stop signals, so a signal to the whole process
    group cannot kill a worker mid-batch (PyTorch's own worker handler dies of a SIGTERM that
    its parent did not send, and the main process then raises). Workers still end with the main
    process: it shuts them down on exit or error, and each notices within seconds if it died."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopFlag:
    """Set by the first stop signal (SIGNALS); nothing heavy runs inside the handler."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, _Handler] = {}

    def install(self) -> None:
        """Take over the stop signals (call from the main thread)."""
        self._pid = os.getpid()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """The stop signals taken over for the block, and given back however it ends (a stop, an
        error, a return): from Python, the next Ctrl-C after a stopped run is Python's again."""
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        """The signal's name, e.g. SIGUSR1."""
        return signal.Signals(self.signal).name if self.signal else ""

    def _handle(self, signum: int, _frame: object) -> None:
        if os.getpid() != self._pid:
            return  # a forked child that kept this handler: the trainer decides
        if signum == signal.SIGHUP:
            leave_hung_up_terminal()
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = signum, now
        elif now - self._first_at > REPEAT_AFTER_S:
            os._exit(exit_status(signum))


def leave_hung_up_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal that hung up (its window was
    closed): every write there fails with EIO, which would end the run before its stop checkpoint."""
    for fd in (1, 2):
        try:
            hung_up = stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd)
        except OSError:
            continue
        if hung_up:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
