"""A run that fits its time (`train.budget`): the plan of its optimizer steps, made from what the run
measured of itself, and the re-plan when the machine's speed drifts.

The plan counts everything from the run's start to summary.json (a command line's first run starts
with its process; a later seed, a sweep's next run or a call from Python starts when it is called):
the start (imports, data,
model, compilation, the measurement itself), every optimizer step, every epoch's end (its
evaluations, the checkpoint's hold on training, the metrics row and plots) and the finish (the
last checkpoint's write, the summary, the end of tracking). It then picks the most optimizer
steps whose cost fits in the budget less a small safety share; `train.epochs` (or `train.steps`)
caps them. The schedule is laid over the planned steps (`Schedule.lay_over`), so a short budget
still runs the recipe's whole warmup and decay.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cifar100.errors import UserError

SAFETY = 0.01  # the plan aims 1 % before the budget's end: the measured rates are estimates
# The finish besides the last checkpoint's write: the summary and plots (a fraction of a second
# here), and the end of W&B tracking when it runs (its offline sync: seconds), reserved with room to spare.
FINISH_SECONDS, WANDB_FINISH_SECONDS = 1.0, 4.0
# A re-plan is made when the projected end passes the budget or falls below 94 % of it, and aims at
# 97 %, the middle: this machine's rate wanders by about 5 % from minute to minute, and a band as
# wide keeps that from swinging the plan back and forth (a 95-99.5 % band aimed at 98 % re-planned
# 13 times in a 10-minute run). The trainer re-plans only on a window of steps timed since the last one.
LATE, EARLY, AIM = 1.0, 0.94, 0.97
# train.budget=auto plans to end this long before the Slurm job's end. launch/slurm/job.sh holds the
# job's warning back until its last AUTO_STOP_SECONDS (20), a late run's time to checkpoint, exit and
# requeue; the other 25 s let a run end that much later than planned (a loaded machine, the one
# re-plan spent) without a requeue, which would cost a wait in the queue and a restart.
SLURM_MARGIN_SECONDS = 45.0
# Drift control projects the epoch ends left at the lower median of the latest EPOCH_END_WINDOW
# costs, the measured one first: one slow end (a checkpoint written while the disk was busy, a
# neighbour's burst) moves nothing; ends that stay slower move it from the second one on.
EPOCH_END_WINDOW = 5


def process_started() -> float:
    """When this process started, on `time.perf_counter`'s scale: a command line's run counts its
    Python start-up and imports too, as /proc dates the process."""
    import psutil  # only where a command line starts a run

    return time.perf_counter() - max(0.0, time.time() - psutil.Process().create_time())


def typical_epoch_end(latest: Sequence[float]) -> float:
    """The lower median of the latest epoch ends' seconds (see EPOCH_END_WINDOW)."""
    return sorted(latest)[(len(latest) - 1) // 2]


@dataclass(frozen=True)
class Costs:
    """What a budget run measured of itself, in seconds."""

    start: float  # process start to the plan
    step: float  # one optimizer step, after warm-up
    epoch_end: float  # one epoch's end: evaluations, the checkpoint's hold on training, the row
    finish: float  # the last checkpoint's write, and the summary and tracking's end
    # Under data.sizes, (size, fraction of the run, seconds per optimizer step) of each phase, each
    # measured at its own size; `step` is then their mean over the whole run.
    phases: tuple[tuple[float, float, float], ...] = ()
    measuring: float = 0.0  # the measurement's own seconds, within `start` (a run that does not measure saves them)


@dataclass
class Plan:
    """The optimizer steps a budget allows, what they were planned from, and any re-plan since."""

    budget_seconds: float
    steps: int
    costs: Costs
    capped: bool  # train.epochs (or train.steps) allowed fewer steps than the budget
    replans: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for summary.json and the checkpoint's meta."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Plan:
        """The plan `to_dict` saved."""
        return cls(
            saved["budget_seconds"],
            int(saved["steps"]),
            costs_from_dict(saved["costs"]),
            bool(saved["capped"]),
            list(saved["replans"]),
        )


def evaluation_scale(batches: Sequence[int], probed: int) -> float:
    """What a whole evaluation costs against one that scored only the first `probed` batches of each
    split (`batches`: every split's batches); the cost is per batch, whatever the split."""
    return sum(batches) / max(1, sum(min(n, probed) for n in batches))


def costs_from_dict(saved: dict[str, Any]) -> Costs:
    """The costs `dataclasses.asdict` saved (JSON turns the phases into lists)."""
    return Costs(**{**saved, "phases": tuple(tuple(p) for p in saved.get("phases", ()))})


def phase_at(phases: Sequence[tuple[float, float, float]], progress: float) -> int:
    """The index of the phase the run is in at `progress` (0..1 of its schedule's shape)."""
    reached = 0.0
    for index, (_, fraction, _) in enumerate(phases):
        reached += fraction
        if progress < reached:
            return index
    return len(phases) - 1


def rest_step(phases: Sequence[tuple[float, float, float]], progress: float) -> float:
    """The mean seconds per optimizer step over the rest of the run from `progress` (0..1 of its
    shape), each phase at its own rate. A re-plan lays the rest of the shape over however many steps
    are left, so each phase keeps its share of them whatever their number."""
    if progress >= 1.0:
        return phases[-1][2]
    start, total = 0.0, 0.0
    for _, fraction, seconds in phases:
        total += max(0.0, start + fraction - max(start, progress)) * seconds
        start += fraction
    return total / (1.0 - progress)


def epochs_of(steps: int, steps_per_epoch: int) -> int:
    """Epochs (evaluations) of a run of `steps` optimizer steps: its last epoch may be partial."""
    return math.ceil(steps / steps_per_epoch)


def ended_epochs(done_steps: int, steps_per_epoch: int) -> int:
    """Epochs whose end is paid when optimizer step `done_steps` has just been taken: not the one that
    step belongs to, even as its last step (its evaluation comes next)."""
    return max(epochs_of(done_steps, steps_per_epoch) - 1, 0)


def fitting_steps(seconds: float, costs: Costs, steps_per_epoch: int, *, done_steps: int, cap: int) -> int:
    """The most optimizer steps in all (at least `done_steps`, at most `cap`) whose remaining steps and
    epoch ends cost no more than `seconds`; `done_steps` when not even one more fits."""
    done_epochs = ended_epochs(done_steps, steps_per_epoch)

    def cost(total: int) -> float:
        ends = epochs_of(total, steps_per_epoch) - done_epochs
        return (total - done_steps) * costs.step + ends * costs.epoch_end

    if cost(done_steps + 1) > seconds:
        return done_steps
    return largest_within(cost, seconds, done_steps, cap)


def largest_within(cost: Callable[[int], float], limit: float, low: int, high: int) -> int:
    """The largest n in low..high whose `cost(n)` (rising with n) is within `limit`, by bisection;
    cost(low) is taken to be within it."""
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def make_plan(budget: float, costs: Costs, steps_per_epoch: int, cap: int) -> Plan:
    """The plan of a new run, or a UserError that says how long a budget this run needs."""
    usable = budget * (1 - SAFETY) - costs.start - costs.finish
    steps = fitting_steps(usable, costs, steps_per_epoch, done_steps=0, cap=cap)
    if steps < 1:
        least = (costs.start + costs.finish + costs.step + costs.epoch_end) / (1 - SAFETY)
        raise UserError(
            f"train.budget={budget_text(budget)} is too short for this run: it measured {costs.start:.1f} s to start, "
            f"{costs.step:.3g} s per optimizer step, {costs.epoch_end:.1f} s per epoch's end (evaluation and "
            f"checkpoint) and {costs.finish:.1f} s to finish, so one step needs at least {math.ceil(least)} s"
        )
    return Plan(budget, steps, costs, capped=steps == cap)


@dataclass(frozen=True)
class Projection:
    """Where a budget run is heading: its projected total seconds, from the recent rate."""

    total: float
    elapsed: float
    step: float
    epoch_end: float


def project(
    plan: Plan,
    total_steps: int,
    done_steps: int,
    steps_per_epoch: int,
    elapsed: float,
    step_seconds: float,
    epoch_end_seconds: float,
) -> Projection:
    """The whole run's projected seconds: `elapsed`, the steps left at `step_seconds`, the epoch ends
    left (the current one included) and the finish."""
    ends = epochs_of(total_steps, steps_per_epoch) - ended_epochs(done_steps, steps_per_epoch)
    total = elapsed + (total_steps - done_steps) * step_seconds + ends * epoch_end_seconds + plan.costs.finish
    return Projection(total, elapsed, step_seconds, epoch_end_seconds)


def replan(
    plan: Plan, projection: Projection, total_steps: int, done_steps: int, steps_per_epoch: int, cap: int
) -> int | None:
    """The new total of optimizer steps when the run's projection has drifted out of its budget (later
    than `LATE` of it, or earlier than `EARLY` of it while the cap allows more steps), else None.
    The decision is recorded in `plan.replans`."""
    late = projection.total > plan.budget_seconds * LATE
    early = projection.total < plan.budget_seconds * EARLY and total_steps < cap
    if not (late or early):
        return None
    usable = plan.budget_seconds * AIM - projection.elapsed - plan.costs.finish
    costs = dataclasses.replace(plan.costs, step=projection.step, epoch_end=projection.epoch_end)
    steps = max(done_steps + 1, fitting_steps(usable, costs, steps_per_epoch, done_steps=done_steps, cap=cap))
    if steps == total_steps or (late and steps > total_steps) or (early and steps < total_steps):
        return None
    plan.replans.append(
        {
            "direction": "shorter" if late else "longer",
            "at_step": done_steps,
            "steps": steps,
            "was": total_steps,
            "projected_seconds": round(projection.total, 1),
            "step_seconds": projection.step,
            "epoch_end_seconds": projection.epoch_end,
        }
    )
    plan.steps = steps
    return steps


def budget_text(seconds: float) -> str:
    """A budget as the user might have typed it: 90s, 10m, 2h30m."""
    s = round(seconds)
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return "".join(f"{n}{unit}" for n, unit in ((h, "h"), (m, "m"), (sec, "s")) if n) or f"{seconds:g}s"


def slurm_seconds_left(job_id: str) -> float:
    """The seconds Slurm gives job `job_id` before its time limit, as `squeue` reports them."""
    if shutil.which("squeue") is None:
        raise UserError("train.budget=auto asks Slurm for the job's time left, but squeue is not on PATH")
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as err:
        raise UserError(f"train.budget=auto: squeue did not report job {job_id}'s time left ({err})") from None
    return parse_slurm_time(out)


def parse_slurm_time(text: str) -> float:
    """Slurm's `[days-]hours:minutes:seconds` (or `minutes:seconds`) in seconds; a UserError for a
    job without a limit."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not text or not all(p.isascii() and p.isdigit() for p in [*parts, *([days] if days else [])]) or len(parts) > 3:
        raise UserError(
            f"train.budget=auto: the job has no time limit to plan for (squeue says {text[:40]!r}); "
            "give a duration instead, e.g. train.budget=2h"
        )
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86_400
