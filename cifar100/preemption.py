"""Stopping cleanly when the cluster asks: SIGTERM or SIGUSR1 only raise a flag.

The training loop reads the flag at the next step boundary, all ranks agree on it, one
checkpoint is written and the process exits with `PREEMPTED_EXIT`, the status the Slurm
scripts requeue on. A second signal (later than a duplicate copy of the first) means "now": the process exits at once.
"""

from __future__ import annotations

import os
import signal
import time

PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a shell reports for a job stopped by SIGTERM
# A launcher that forwards the signal it got to a worker that got it from the process group too
# delivers two copies within milliseconds: only a signal after this many seconds means "now".
REPEAT_AFTER_S = 0.5
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the CLI exits with PREEMPTED_EXIT."""


class StopFlag:
    """Set by the first SIGTERM/SIGUSR1; nothing heavy runs inside the handler."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGUSR1 (call from the main thread)."""
        self._pid = os.getpid()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        """The signal's name, e.g. SIGUSR1."""
        return signal.Signals(self.signal).name if self.signal else ""

    def _handle(self, signum: int, _frame: object) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the trainer decides, the worker carries on until told
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = signum, now
        elif now - self._first_at > REPEAT_AFTER_S:
            os._exit(PREEMPTED_EXIT)
