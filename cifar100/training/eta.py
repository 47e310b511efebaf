"""The whole run's time, forecast from the steps this process has timed: the estimate the progress
bar and the epoch lines show, and the one warning a run far too long for its hardware gets."""

from __future__ import annotations

import statistics
import time
import warnings
from collections import deque

# Optimizer steps timed before an estimate is shown; the first step of each epoch is never timed
# (it pays the loader's start, and the first one compilation and autotuning).
TIMED_STEPS = 3
# A budget run's current rate: the median of up to RECENT_WINDOW of the latest timed steps, judged
# once RECENT_STEPS are in. A median ignores a one-off stall (the elapsed time already holds it) and a
# noisy neighbour's bursts, and moves once most of the window runs at a new speed.
RECENT_STEPS, RECENT_WINDOW = 20, 60
# ...or fewer, once they add up to this long: on a machine that takes a minute a step, the user
# hears what the run will cost after two steps, not four.
ENOUGH_SECONDS = 30.0


def duration_text(seconds: float) -> str:
    """12 s, 3 m 05 s, 2 h 15 m, 18 d 04 h."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} m {s % 60:02d} s"
    if s < 86_400:
        return f"{s // 3600} h {s % 3600 // 60:02d} m"
    return f"{s // 86_400} d {s % 86_400 // 3600:02d} h"


class RunClock:
    """Times optimizer steps and evaluations, and forecasts the rest of a run of `total_steps`
    optimizer steps and `epochs` evaluations from `done_steps` and `done_epochs` already done."""

    def __init__(self, total_steps: int, epochs: int, done_steps: int, done_epochs: int):
        self.total_steps, self.epochs = total_steps, epochs
        self.done_steps, self.done_epochs = done_steps, done_epochs
        self.timed_steps, self.timed_seconds, self.eval_seconds = 0, 0.0, 0.0
        self.recent: deque[float] = deque(maxlen=RECENT_WINDOW)
        self._last: float | None = None

    def start_epoch(self) -> None:
        """The next step is the first of an epoch: not timed."""
        self._last = None

    def step(self, global_step: int) -> None:
        """Optimizer step `global_step` (1-based) has been queued."""
        now = time.perf_counter()
        if self._last is not None:
            self.timed_steps += 1
            self.timed_seconds += now - self._last
            self.recent.append(now - self._last)
        self._last, self.done_steps = now, global_step

    def evaluated(self, seconds: float) -> None:
        """An epoch ended with an evaluation that took `seconds`."""
        self.done_epochs += 1
        self.eval_seconds = seconds

    @property
    def step_seconds(self) -> float | None:
        """Seconds per optimizer step, once enough steps were timed (None before)."""
        ready = self.timed_steps >= TIMED_STEPS or (self.timed_steps and self.timed_seconds >= ENOUGH_SECONDS)
        return self.timed_seconds / self.timed_steps if ready else None

    def restart_window(self) -> None:
        """Forget the latest steps' times: a re-plan has judged them."""
        self.recent.clear()

    @property
    def recent_step_seconds(self) -> float | None:
        """The median seconds per optimizer step of the latest timed steps (None before TIMED_STEPS)."""
        return statistics.median(self.recent) if len(self.recent) >= TIMED_STEPS else None

    def seconds_left(self) -> float | None:
        """The forecast of the rest of the run: its steps, and its evaluations at the last one's cost."""
        if self.step_seconds is None:
            return None
        return (self.total_steps - self.done_steps) * self.step_seconds + (
            self.epochs - self.done_epochs
        ) * self.eval_seconds

    def left_text(self) -> str | None:
        """The forecast as the progress bar shows it."""
        left = self.seconds_left()
        return None if left is None else duration_text(left)


def too_long(clock: RunClock, elapsed: float, limit_hours: float, device: str) -> str | None:
    """The warning for a run whose projected total (`elapsed` so far plus the forecast) exceeds
    `limit_hours`, naming what to run instead on this `device` ("cpu" or "cuda"); None otherwise."""
    left = clock.seconds_left()
    if left is None or elapsed + left <= limit_hours * 3600:
        return None
    instead = (
        "recipe=cpu, made for a CPU, fits its whole run in 10 minutes (what it reached: cifar100 recipes)"
        if device == "cpu"
        else "more GPUs (accelerate launch --num_processes N) or a smaller model would shorten it"
    )
    return (
        f"this run is projected to take {duration_text(elapsed + left)} on {device} ({clock.step_seconds:.3g} s "
        f"per step measured, {clock.total_steps - clock.done_steps} steps and {clock.epochs - clock.done_epochs} "
        f"evaluations left), beyond log.warn_hours={limit_hours:g}: {instead}; or lower train.epochs, "
        "or give the run a time to fit in, "
        "e.g. train.budget=2h"
    )


class LengthWarning:
    """The too-long warning, given at most once: by the main process, and never for a budget run (its
    length is its budget); `given` starts true where it is not to be given."""

    def __init__(self, limit_hours: float, device: str, given: bool):
        self.limit_hours, self.device, self.given = limit_hours, device, given

    def check(self, clock: RunClock, elapsed: float) -> None:
        """Warn once `elapsed` seconds plus what `clock` forecasts pass log.warn_hours."""
        if self.given:
            return
        message = too_long(clock, elapsed, self.limit_hours, self.device)
        if message:
            warnings.warn(message, stacklevel=1)
            self.given = True
