"""`train.budget` as a component of the run: the trainer calls its hooks, in one place each.

`plan_run` (before the loop, on a fresh start): measure the run's own parts and plan its steps;
`restored` (after a resume's checkpoint has loaded): replay the plan it holds; `after_step` (each
optimizer step): re-plan when the projected end drifts out of the budget; `epoch_ended` (each epoch's
end): its cost for the projection; `summary` (at the finish): the plan as summary.json records it.
The arithmetic of plans and re-plans is budget.py's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator

from cifar100.config import Config, parse_duration
from cifar100.data.loader import epoch_batches
from cifar100.errors import UserError
from cifar100.preemption import StopFlag
from cifar100.runfolder.checkpoint import PREFIX, is_complete, on_host, save_checkpoint
from cifar100.runfolder.tracking import plot_run
from cifar100.training import budget
from cifar100.training.budget import Costs, Plan
from cifar100.training.engine import Engine, EpochProgress
from cifar100.training.eta import RECENT_STEPS, RunClock
from cifar100.training.evaluation import EvalSettings
from cifar100.training.optim import Schedule
from cifar100.training.ranks import main_decides
from cifar100.training.train_state import TrainState

# A budget run measures its rate after this many optimizer steps (compilation, cuDNN's autotuning and
# the loader's start fall in them), over at least PROBE_STEPS more and about PROBE_SHARE of the budget.
WARM_STEPS, PROBE_STEPS, PROBE_SHARE = 3, 5, 0.01
PROBE_EVAL_BATCHES = 2  # evaluation batches of each split the measurement times, after one untimed


class MeasuredRun(Protocol):
    """What the measurement uses of the run: its built parts, its evaluation and its stop."""

    accelerator: Accelerator
    state: TrainState
    engine: Engine
    loader: Any
    steps_per_epoch: int
    eval_settings: EvalSettings
    eval_sets: dict
    stop: StopFlag

    def score(self, row: dict, batches: int | None = None) -> None: ...

    def stop_if_asked(self) -> None: ...


def refuse_auto_outside_slurm(cfg: Config) -> None:
    """train.budget=auto reads a Slurm job's time limit: refused (one line) outside one."""
    if cfg.train.budget == "auto" and not os.environ.get("SLURM_JOB_ID"):
        raise UserError(
            "train.budget=auto plans to a Slurm job's time limit, and this is not a Slurm job "
            "(no SLURM_JOB_ID): give a duration instead, e.g. train.budget=2h"
        )


class TimeBudget:
    """The run's time budget: its plan (None without one), where its time counts from, and drift control."""

    def __init__(self, cfg: Config, accelerator: Accelerator, counted_from: float):
        self.cfg, self.accelerator = cfg, accelerator
        self.counted_from = counted_from  # this start's beginning, on time.perf_counter's scale
        self.earlier = 0.0  # seconds of the run's earlier starts (before a resume)
        self.plan: Plan | None = None
        self.follows_drift = False  # re-plans when the projected end leaves the budget's band
        # The latest epoch ends' seconds for the projection, the plan's measured one first.
        self.epoch_ends: deque[float] = deque(maxlen=budget.EPOCH_END_WINDOW)
        self.phase = 0  # the data.sizes phase the latest drift check saw

    @property
    def wanted(self) -> bool:
        """Whether the config asks for a budget."""
        return self.cfg.train.budget != "none"

    def since_start(self) -> float:
        """Seconds of this run so far: earlier starts' and this start's since it began."""
        return self.earlier + time.perf_counter() - self.counted_from

    def starts_afresh(self) -> bool:
        """Whether this start trains from step 0 (so a budget needs a plan): resume=none, or resume=auto
        with no complete checkpoint in the run folder. The main process looks; every process hears it."""
        cfg = self.cfg
        ckpts = Path(cfg.log.dir) / cfg.name / "checkpoints"
        return main_decides(
            self.accelerator,
            lambda: (
                cfg.resume == "none"
                or (
                    cfg.resume == "auto"
                    and not any(is_complete(p) for p in (ckpts.glob(f"{PREFIX}*") if ckpts.is_dir() else ()))
                )
            ),
        )

    def plan_run(self, run: MeasuredRun) -> None:
        """Hook before the loop: measure this run's costs, plan its steps within the budget and lay the
        schedule over them."""
        cfg, acc, steps_per_epoch = self.cfg, self.accelerator, run.steps_per_epoch
        self.earlier = 0.0
        if cfg.train.budget == "auto":
            left = main_decides(acc, lambda: budget.slurm_seconds_left(os.environ["SLURM_JOB_ID"]))
            seconds = self.since_start() + left - budget.SLURM_MARGIN_SECONDS
        else:
            seconds = parse_duration("train.budget", cfg.train.budget)
        # Never the run folder (none exists yet), and removed however the measurement ends.
        with tempfile.TemporaryDirectory(prefix="cifar100-budget-") as scratch:
            costs = self._measure(run, Path(scratch), seconds)
        cap = cfg.train.steps or steps_per_epoch * cfg.train.epochs
        self.plan = plan = budget.make_plan(seconds, costs, steps_per_epoch, cap)
        run.state.schedule.lay_over(plan.steps)
        c, steps, epochs = costs, plan.steps, budget.epochs_of(plan.steps, steps_per_epoch)
        at_sizes = ", ".join(f"{step:.3g} s at {size:g} px" for size, _, step in c.phases)
        per_step = f"{c.step:.3g} s per optimizer step" + (f" over the run ({at_sizes})" if at_sizes else "")
        acc.print(
            f"budget {budget.budget_text(seconds)}: measured {per_step}, {c.epoch_end:.2f} s "
            f"per epoch's end (evaluation and checkpoint), {c.start:.1f} s to start; planned {steps} steps = "
            f"{steps / steps_per_epoch:.2f} epochs{' (all of train.epochs)' if plan.capped else ''}, "
            f"{steps * c.step:.0f} s of steps, {epochs * c.epoch_end:.0f} s for {epochs} epoch ends, "
            f"{c.finish:.1f} s to finish",
            flush=True,
        )

    def _measure(self, run: MeasuredRun, scratch: Path, seconds: float) -> Costs:
        """Time this run's own parts on its real model and data, then put every part back as it was:
        a checkpoint's copy and write (into `scratch`), optimizer steps after WARM_STEPS, one evaluation
        and the plots of its row. Every process takes part; the main process's figures are the plan's."""
        acc, cfg = self.accelerator, self.cfg
        began = time.perf_counter()
        start = on_host(run.state.state_dict())  # what training holds still for at each checkpoint
        copied = time.perf_counter()
        if acc.is_main_process:
            save_checkpoint(scratch, "probe", start.weights, start.state, {**start.meta, "config": {}}, ema=start.ema)
        written = time.perf_counter()
        # Each data.sizes phase's steps timed at its own size, the probe's time shared between them.
        sizes = cfg.data.sizes or ((None, 1.0),)
        timed = [self._time_steps(run, seconds, size, len(sizes)) for size, _ in sizes]
        lr = timed[-1][1]
        scored = time.perf_counter()
        row: dict = {"epoch": 1, "lr": lr}
        # A few batches of each split stand for the whole evaluation, whose cost is per batch.
        counts = [math.ceil(len(labels) / run.eval_settings.batch_size) for _, labels in run.eval_sets.values()]
        run.score(row, 1)  # untimed: the evaluation's own warm-up (its compilation, autotuning)
        scored = time.perf_counter()
        run.score(row, PROBE_EVAL_BATCHES)
        evaluated = time.perf_counter()
        if acc.is_main_process:  # an epoch's plots, of two rows shaped as training's (test figures as train's)
            rows = [{**row, "epoch": e, "train_loss": row["test_loss"], "train_top1": row["test_top1"]} for e in (1, 2)]
            plot_run(rows, scratch, "budget")
        done = time.perf_counter()
        run.state.load_state_dict(start, Path("the run's start"))
        acc.step = 0  # Accelerate's count of micro-steps towards the next gradient sync
        steps = [_step_seconds(phase_stamps, phase_began) for phase_stamps, _, phase_began in timed]
        phases = tuple((size, fraction, step) for (size, fraction), step in zip(cfg.data.sizes, steps))
        step = sum(fraction * step for _, fraction, step in phases) if phases else steps[0]
        scale = budget.evaluation_scale(counts, PROBE_EVAL_BATCHES)
        epoch_end = (evaluated - scored) * scale + (done - evaluated) + (copied - began)
        tracking = budget.WANDB_FINISH_SECONDS if cfg.log.wandb.mode != "disabled" else budget.FINISH_SECONDS
        finish = (written - copied) + tracking
        return main_decides(
            acc, lambda: Costs(self.since_start(), step, epoch_end, finish, phases, time.perf_counter() - began)
        )

    def _time_steps(
        self, run: MeasuredRun, seconds: float, size: float | None, probes: int
    ) -> tuple[list[float], float, float]:
        """The times at which the run's own optimizer steps ended (at `size` px, one of `probes` that
        share the probe's time; None: as the run trains), on a schedule of the probe's length, that
        schedule's rate at its end, and when the probe began; a UserError once the budget is spent."""
        acc, cfg, steps_per_epoch = self.accelerator, self.cfg, run.steps_per_epoch
        stamps: list[float] = []
        began = time.perf_counter()
        most = WARM_STEPS + PROBE_STEPS
        limit = min(steps_per_epoch, 10 * most)  # the probe stays inside one epoch of batches
        probe = Schedule(run.state.optimizer, cfg.optim, cfg.sched, steps_per_epoch, cfg.train.epochs, limit)
        # The run's own engine (its micro-batches included) on a schedule of the probe's length.
        own = run.engine
        sizes = own.rules.sizes if size is None else ((size, 1.0),)
        quiet = dataclasses.replace(own.rules, progress=False, sizes=sizes)
        engine = Engine(own.model, own.optimizer, probe, own.mixer, own.accelerator, quiet, own.ema)
        engine.micro_batch = own.micro_batch

        def enough() -> bool:  # every process's answer counts: the engine stops them all at one step
            if self.since_start() >= seconds or run.stop:  # the budget is spent, or a stop came
                return True
            timed = stamps[-1] - stamps[WARM_STEPS - 1] if len(stamps) > WARM_STEPS else 0.0
            return len(stamps) >= most and timed >= min(PROBE_SHARE * seconds, 30.0) / probes

        engine.train_epoch(
            1,
            epoch_batches(run.loader, 1, 0, acc),
            EpochProgress(),
            stop_requested=enough,
            after_step=lambda _: stamps.append(time.perf_counter()),
        )
        getattr(run.loader, "end", lambda: None)()  # Accelerate's loader left mid-epoch: leave its gradient state
        run.stop_if_asked()
        spent = main_decides(acc, self.since_start)
        if spent >= seconds:  # no need to measure the rest: not even the start fits
            raise UserError(
                f"train.budget={budget.budget_text(seconds)} is too short for this run: {spent:.1f} s had passed "
                f"when its measurement of the rate ended ({len(stamps)} optimizer steps), before its evaluation "
                "and before any training; give it several times that"
            )
        return stamps, probe.lr, began

    def restored(self, saved: dict | None, earlier: float, resumed: bool) -> None:
        """Hook once the start point has loaded: a resume's plan replayed as the checkpoint holds it (not
        re-made), the earlier starts' `earlier` seconds counted, and drift control on where it applies
        (a requeued Slurm job, budget auto, replays its plan in a fresh job window as it is)."""
        if saved:
            self.plan = Plan.from_dict(saved)
        self.earlier = earlier
        if self.plan is not None:
            self.epoch_ends.append(self.plan.costs.epoch_end)
        self.follows_drift = (
            self.plan is not None and self.cfg.train.replan and not (resumed and self.cfg.train.budget == "auto")
        )

    def epoch_ended(self, seconds: float) -> None:
        """Hook at each epoch's end: what it cost (evaluation, checkpoint, row), for the projection."""
        self.epoch_ends.append(seconds)

    def after_step(self, schedule: Schedule, clock: RunClock, steps_per_epoch: int) -> None:
        """Hook after each optimizer step: every 0.5 % of the planned steps, re-plan when the projected
        end has drifted out of the budget (every process the same way: the main process's projection
        decides), bending the schedule over what is left."""
        if not self.follows_drift or schedule.step_count % max(1, schedule.total_steps // 200):
            return
        plan, acc, cfg = self.plan, self.accelerator, self.cfg
        assert plan is not None
        timed = clock.recent_step_seconds
        # Not on the first steps' noise, nor on steps the last re-plan already judged (it empties the
        # window): RECENT_STEPS timed since, and a measured epoch's end once one has come (the plan's before).
        if timed is None or len(clock.recent) < RECENT_STEPS:
            return
        timed = self._rest_step(plan, schedule, clock, timed)
        if timed is None:
            return
        cap = cfg.train.steps or steps_per_epoch * cfg.train.epochs

        def decide() -> dict | None:  # on the main process: its projection (and plan) decide
            projection = budget.project(
                plan,
                schedule.total_steps,
                schedule.step_count,
                steps_per_epoch,
                self.since_start(),
                timed,
                budget.typical_epoch_end(self.epoch_ends),
            )
            steps = budget.replan(plan, projection, schedule.total_steps, schedule.step_count, steps_per_epoch, cap)
            return plan.replans[-1] if steps else None

        replanned = main_decides(acc, decide)
        if not replanned:
            return
        clock.restart_window()
        if not acc.is_main_process:
            plan.replans.append(replanned)
            plan.steps = replanned["steps"]
        schedule.bend(schedule.step_count, replanned["steps"])
        epochs = budget.epochs_of(schedule.total_steps, steps_per_epoch)
        clock.total_steps, clock.epochs = schedule.total_steps, epochs
        acc.print(
            f"budget: the run was heading for {replanned['projected_seconds']:.0f} s of its "
            f"{plan.budget_seconds:.0f} s ({replanned['step_seconds']:.3g} s per step now): what is left of "
            f"the schedule now ends at step {replanned['steps']} instead of {replanned['was']} "
            f"({epochs} epochs)",
            flush=True,
        )

    def _rest_step(self, plan: Plan, schedule: Schedule, clock: RunClock, timed: float) -> float | None:
        """The step cost to project the rest of the run at: the recent rate, and under data.sizes that
        rate scaled from the current phase's measured one to the phases still ahead; None just after a
        new phase began (its window starts again: it held the last phase's steps)."""
        phases = plan.costs.phases
        if not phases:
            return timed
        progress = schedule.position(schedule.step_count) / schedule.shape_steps
        phase = budget.phase_at(phases, progress)
        if phase != self.phase:
            self.phase = phase
            clock.restart_window()
            return None
        return timed / phases[phase][2] * budget.rest_step(phases, progress)

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        """Hook at the finish: the plan as summary.json records it (nothing without one): what it was
        made from, its re-plans, the rate of its last step and when the run ended (seconds since the
        run's start, earlier starts included)."""
        if self.plan is None:
            return {}
        return {
            "plan": {
                **self.plan.to_dict(),
                "last_step_lr": schedule.lr_at(schedule.step_count - 1),
                "ended_seconds": round(self.since_start(), 2),
            }
        }


def _step_seconds(stamps: list[float], began: float) -> float:
    """Seconds per optimizer step after the warm-up steps (over every step, from `began`, when too few)."""
    warm = min(WARM_STEPS, len(stamps) - 1)
    if warm > 0:
        return (stamps[-1] - stamps[warm - 1]) / (len(stamps) - warm)
    return ((stamps[-1] if stamps else began) - began) / max(1, len(stamps))
