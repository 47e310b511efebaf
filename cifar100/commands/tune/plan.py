"""The rungs of a search from its budget: how many trials each rung scores, how many constant-rate
steps they have trained by then, the cooldown branch that scores them, and what each rung costs at
the measured rate.

The budget is process time: the sum, over every trial process (a trunk's segment up to a rung, a
cooldown branch), of its seconds from start to exit, times its processes (a trial under DDP on 8
GPUs spends 8 GPU-seconds a second). Trials running side by side (parallel=N) spend it faster, not
less of it. The rate is one measured process of the first trial (see `controller.measure`): a
process's start, an optimizer step, an epoch's end (evaluations, checkpoint) and its finish.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cifar100.errors import UserError
from cifar100.training.budget import SAFETY, Costs, budget_text, costs_from_dict, largest_within

LARGEST = 10**9  # steps: the search's plan is bounded by its budget long before this
# A first rung shorter than this (in epochs) is warned of: BENCHMARKS.md's search of recipe=cpu at 0.36
# epochs found its order the reverse of the full runs'; where the order starts to hold is not measured.
SHORT_FIRST_RUNG = 1.0


@dataclass(frozen=True)
class Rung:
    """One rung: `trials` scored after `steps` constant-rate steps and a branch of `cooldown` more."""

    trials: int
    steps: int
    cooldown: int
    seconds: float  # planned process time of its trunks' segments and branches

    @property
    def branch_share(self) -> float:
        """The branch's sched.cooldown: its cooldown steps over its whole length."""
        return self.cooldown / (self.steps + self.cooldown)


@dataclass(frozen=True)
class SearchPlan:
    """Every rung of a search, what they were planned from, and the seeded re-runs after it."""

    budget_seconds: float
    trials: int
    reduction: int
    cooldown: float
    rungs: tuple[Rung, ...]
    costs: Costs
    steps_per_epoch: int
    rerun_seconds: float  # one seeded re-run of a setting: the top rung's trunk and branch in one run

    @property
    def seconds(self) -> float:
        """The planned process time of the whole search (the re-runs aside)."""
        return sum(r.seconds for r in self.rungs)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the state file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> SearchPlan:
        """The plan `to_dict` saved."""
        return cls(
            **{**saved, "rungs": tuple(Rung(**r) for r in saved["rungs"]), "costs": costs_from_dict(saved["costs"])},
        )


def trials_per_rung(trials: int, reduction: int) -> list[int]:
    """Successive halving's counts: all trials, then a `reduction`-th of them, ... down to one."""
    counts = [trials]
    while counts[-1] >= reduction:
        counts.append(counts[-1] // reduction)
    return counts


def _ends(start: int, end: int, steps_per_epoch: int, last: bool) -> int:
    """Epoch ends (evaluation, checkpoint) between optimizer steps `start` and `end`; a run's `last`
    epoch ends at `end` even when partial."""
    whole = end // steps_per_epoch - start // steps_per_epoch
    return whole + (1 if last and end % steps_per_epoch else 0)


def _process(costs: Costs, steps: int, ends: int) -> float:
    return costs.start + steps * costs.step + ends * costs.epoch_end + costs.finish


def _rungs(top: int, counts: list[int], reduction: int, cooldown: float, costs: Costs, spe: int) -> list[Rung]:
    rungs, before = [], 0
    for r, n in enumerate(counts):
        steps = max(1, round(top / reduction ** (len(counts) - 1 - r)))
        extra = max(1, round(steps * cooldown / (1 - cooldown)))
        last = r == len(counts) - 1
        trunk = _process(costs, steps - before, _ends(before, steps, spe, last))
        branch = _process(costs, extra, _ends(steps, steps + extra, spe, True))
        rungs.append(Rung(n, steps, extra, n * (trunk + branch)))
        before = steps
    return rungs


def make_plan(
    budget: float, trials: int, reduction: int, cooldown: float, costs: Costs, steps_per_epoch: int, warmup: int
) -> SearchPlan:
    """The longest rungs whose process time fits `budget` (less a 1 % margin); the first rung's steps
    must pass the `warmup` steps, or a UserError says how long a budget the search needs."""
    counts = trials_per_rung(trials, reduction)
    usable = budget * (1 - SAFETY)

    def cost(top: int) -> float:
        return sum(r.seconds for r in _rungs(top, counts, reduction, cooldown, costs, steps_per_epoch))

    least = (warmup + 1) * reduction ** (len(counts) - 1)  # the first rung's trials past their warmup
    if cost(least) > usable:
        raise UserError(
            f"budget={budget_text(budget)} is too small for {trials} trials in {len(counts)} rungs: at the measured "
            f"{costs.step:.3g} s per step, {costs.start:.1f} s per process start and {costs.epoch_end:.2f} s per "
            f"epoch's end, the shortest rungs (the first past its {warmup} warmup steps) need "
            f"{math.ceil(cost(least) / (1 - SAFETY))} s; give more, or fewer trials=, or a shorter sched.warmup_epochs"
        )
    low = largest_within(cost, usable, least, LARGEST)
    rungs = tuple(_rungs(low, counts, reduction, cooldown, costs, steps_per_epoch))
    top = rungs[-1]
    rerun = _process(costs, top.steps + top.cooldown, _ends(0, top.steps + top.cooldown, steps_per_epoch, True))
    return SearchPlan(budget, trials, reduction, cooldown, rungs, costs, steps_per_epoch, rerun)


def describe(plan: SearchPlan, parallel: int, reruns: int) -> list[str]:
    """The plan as printed before anything runs (and by --plan)."""
    c, spe = plan.costs, plan.steps_per_epoch
    lines = [
        f"measured: {c.step:.3g} s per optimizer step ({spe} steps an epoch), {c.epoch_end:.2f} s per epoch's end "
        f"(evaluations and checkpoint), {c.start + c.finish:.1f} s to start and finish a process",
    ]
    for i, r in enumerate(plan.rungs):
        nxt = plan.rungs[i + 1].trials if i + 1 < len(plan.rungs) else 0
        wall = r.seconds / min(parallel, r.trials)
        fate = f"{nxt} go on" if nxt else "the winner's whole run"
        lines.append(
            f"rung {i}: {r.trials} trial(s) x {r.steps} constant-rate steps ({r.steps / spe:.2f} epochs) + a "
            f"{r.cooldown}-step cooldown branch, scored on the validation split; {fate}: {r.seconds:.0f} s of "
            f"process time" + (f", about {wall:.0f} s with parallel={parallel}" if parallel > 1 else "")
        )
    first = plan.rungs[0].steps / spe
    if len(plan.rungs) > 1 and first < SHORT_FIRST_RUNG:
        lines.append(
            f"warning: rung 0 trains {first:.2f} epochs; on recipe=cpu a first rung of 0.36 epochs ranked 9 "
            "settings against their full runs' order (Spearman -0.42: the lowest rates lead early), so its "
            "cut may drop the best; more budget=, fewer trials= or a smaller reduction= lengthen it (BENCHMARKS.md)"
        )
    lines.append(
        f"planned: {plan.seconds:.0f} s of process time of budget={budget_text(plan.budget_seconds)} "
        f"({plan.budget_seconds:.0f} s)"
        + (f"; then {reruns} seeded re-run(s) of {plan.rerun_seconds:.0f} s each, after the budget" if reruns else "")
    )
    return lines
