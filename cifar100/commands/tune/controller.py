"""The search's controller: it measures the rate, plans the rungs, runs each rung's trials (one after
another, or `parallel` processes at once), scores them, promotes the best and records every step in
ONE state file, `<log.dir>/<name>/tune.json`, which only it writes (atomically).

A trial is a trunk, `trials/tNN`: one WSD run at the constant rate (cooldown 0) over the top rung's
steps, paused at each rung's steps (`train.pause_at_step`) and continued by `resume=auto` when
promoted, exactly as an uninterrupted run. At each rung a cooldown branch, `trials/tNN-rR`, forks
off the paused checkpoint and decays the rate over `cooldown` of its length; its last validation
top-1 is the trial's score. Killing the controller (or a trial) at any moment and running the same
command again goes on: finished work is read back from the state file and the run folders, a
trial in the middle of its work resumes as any run does. Decisions are made only once a rung's
scores are all in, ties broken by trial number, so the same file and seed make the same ones
whatever order trials finish in. The top rung's branch is the winner's whole run (its cooldown is
`cooldown` of it); the `top` settings then run again with `seeds`, scored on the test split.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar100.commands.sweep import _text as value_text
from cifar100.commands.tune import plan as planning
from cifar100.commands.tune import space
from cifar100.commands.tune.searchfile import SearchFile
from cifar100.config import Config, load_config
from cifar100.errors import UserError, clip
from cifar100.preemption import Preempted
from cifar100.runfolder.checkpoint import PREFIX, is_complete, step_tag
from cifar100.runfolder.safe_files import MiB, read_json, write_atomic
from cifar100.training.budget import Costs, budget_text, costs_from_dict

STATE = "tune.json"
STARTUP_TRIES = 3  # a trial that fails before it trains this many times stops the search
# The measuring run's train.budget: room for a large model's start (compilation included).
PROBE_BUDGET = "10m"
CIFAR_TRAIN = 50_000
STOPPED = (129, 130, 143)  # a stop signal reached the trial too: the controller stops with it


@dataclass
class Search:
    """A search being run: its file, trials, plan and state, and how to start its processes."""

    file: SearchFile
    folder: Path
    settings: list[dict[str, Any]]
    extra: list[str]  # the command line's key=value, for every trial
    plan: planning.SearchPlan
    state: dict[str, Any]
    parallel: int = 1
    python: list[str] = field(default_factory=lambda: [sys.executable, "-m", "cifar100"])

    def save(self) -> None:
        """The state file, written whole through a temporary file and a rename."""
        write_atomic(self.folder / STATE, (json.dumps(self.state, indent=1) + "\n").encode())

    def args(self, index: int) -> list[str]:
        """A trial's train arguments less its name, length, cooldown and resume."""
        values = [f"{k}={value_text(v)}" for k, v in self.settings[index].items()]
        return trial_args(self.file, self.extra, values, self.folder)


def trial_args(search: SearchFile, extra: list[str], values: list[str], folder: Path) -> list[str]:
    """The train arguments every process of a trial shares."""
    fixed = [f"{k}={value_text(v)}" for k, v in search.fixed.items() if not any(e.startswith(k + "=") for e in extra)]
    return [
        f"recipe={search.recipe}",
        *fixed,
        *(e for e in extra if not e.startswith("log.dir=")),
        *values,
        "sched.name=wsd",
        "train.budget=none",
        f"log.dir={folder / 'trials'}",
        f"sweep.name={search.name}",
        f"sweep.overrides={value_text(values)}",
    ]


def name_of(index: int) -> str:
    """A trial's trunk folder name."""
    return f"t{index:02d}"


def check_trials(search: SearchFile, extra: list[str], settings: list[dict[str, Any]]) -> Config:
    """Every trial's whole config, checked before anything is made; returns the first."""
    configs = []
    for i, values in enumerate(settings):
        args = trial_args(search, extra, [f"{k}={value_text(v)}" for k, v in values.items()], Path("."))
        try:
            configs.append(load_config(args[0].partition("=")[2], [*args[1:], "train.steps=1", f"name={name_of(i)}"]))
        except UserError as err:
            raise UserError(
                f"{search.path}: trial {i} ({' '.join(f'{k}={v}' for k, v in values.items())}): {err}"
            ) from None
    first = configs[0]
    own = load_config(search.recipe, []).sched.name
    if own == "plateau":
        raise UserError(
            f"{search.path}: recipe {search.recipe}'s schedule is plateau, which decays when the validation loss "
            "stalls: no constant rate plus cooldown stands for it; search a recipe with cosine, step, none or wsd"
        )
    if first.data.val_size == 0:
        raise UserError(
            f"{search.path}: the rungs are scored on a validation split held out from the training set, never "
            "on test: set overrides: {data.val_size: N} (e.g. 5000)"
        )
    return first


def steps_per_epoch(cfg: Config) -> int:
    """Optimizer steps of an epoch of one process: the training images (val held out, train_limit
    applied) in whole batches."""
    images = CIFAR_TRAIN - cfg.data.val_size
    if 0 < cfg.data.train_limit < images:
        images = cfg.data.train_limit
    return max(1, images // cfg.data.batch_size)


def measure(search: SearchFile, extra: list[str], values: dict[str, Any], python: list[str]) -> tuple[Costs, float]:
    """The rate of the first trial, measured by one short budget run of it in a scratch folder:
    its start, step, epoch's end and finish (summary.json's plan), and the seconds it took."""
    scratch = Path(tempfile.mkdtemp(prefix="cifar100-tune-probe-"))
    try:
        args = trial_args(search, extra, [f"{k}={value_text(v)}" for k, v in values.items()], scratch)
        args = [a for a in args if a != "train.budget=none"]
        began = time.monotonic()
        out = subprocess.run(
            [*python, "train", *args, "name=probe", "train.steps=1", f"train.budget={PROBE_BUDGET}"],
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - began
        summary = scratch / "trials" / "probe" / "summary.json"
        if out.returncode != 0 or not summary.is_file():
            raise UserError(f"measuring the rate of trial 0 failed: {last_line(out.stderr)}")
        costs = costs_from_dict(read_json(summary, MiB, "summary.json")["plan"]["costs"])
        # Its start includes the rate's own measurement, which a trial's process does not make.
        return dataclasses.replace(costs, start=costs.start - costs.measuring, measuring=0.0), seconds
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def last_line(text: str) -> str:
    """A process's last non-empty line of output, cut short."""
    lines = [line for line in text.splitlines() if line.strip()]
    return clip(lines[-1] if lines else "(no output)", 300)


def fingerprint(search: SearchFile, budget: str, trials: int | None, extra: list[str]) -> str:
    """What must not change between two runs of one search's command."""
    text = search.path.read_bytes() + json.dumps([budget, trials, extra]).encode()
    return hashlib.sha256(text).hexdigest()


def open_search(
    search: SearchFile,
    budget: str,
    budget_seconds: float,
    trials: int | None,
    extra: list[str],
    parallel: int,
    plan_only: bool,
    existing: bool = False,
) -> Search | None:
    """The search in `<log.dir>/<name>/`: continued from its state file, or planned afresh (its rate
    measured first); None with --plan, which prints the plan only and makes nothing."""
    settings = space.settings(search, trials)
    first = check_trials(search, extra, settings)
    given = [e.partition("=")[2] for e in extra if e.startswith("log.dir=")]
    folder = Path(given[-1] if given else load_config(search.recipe, []).log.dir) / search.name
    mark = fingerprint(search, budget, trials, extra)
    if (folder / STATE).is_file() and not plan_only:
        return _continue_search(search, folder, mark, extra, parallel, existing)
    if existing:
        raise UserError(f"{folder / STATE}: no such search (an array task continues one its controller started)")
    python = [sys.executable, "-m", "cifar100"]
    per_epoch = steps_per_epoch(first)
    warmup = math.ceil(first.sched.warmup_epochs * per_epoch)
    costs, probe_seconds = measure(search, extra, settings[0], python)
    plan = planning.make_plan(
        budget_seconds, len(settings), search.reduction, search.cooldown, costs, per_epoch, warmup
    )
    print(
        f"search {search.name}: {len(settings)} trials ({search.sampler}, seed {search.seed}), {len(plan.rungs)} "
        f"rungs, reduction factor {search.reduction}, cooldown {search.cooldown:g} of each scored run; "
        f"budget={budget} of process time (processes x seconds: GPU-seconds under DDP)",
        flush=True,
    )
    _print_plan(search, plan, parallel)
    if plan_only:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    state = _new_state(search, mark, budget, settings, plan, probe_seconds)
    found = Search(search, folder, settings, extra, plan, state, parallel, python)
    found.save()
    return found


def _new_state(
    search: SearchFile, mark: str, budget: str, settings: list[dict[str, Any]], plan: planning.SearchPlan, probe: float
) -> dict[str, Any]:
    """A new search's state file: what it is (fingerprint, file, budget, trials, plan), no results yet."""
    return {
        "fingerprint": mark,
        "file": str(search.path),
        "name": search.name,
        "budget": budget,
        "settings": settings,
        "plan": plan.to_dict(),
        "probe_seconds": round(probe, 2),
        "results": {},
        "promoted": {},
        "startup_failures": {},
        "reruns": {},
    }


def _continue_search(
    search: SearchFile, folder: Path, mark: str, extra: list[str], parallel: int, existing: bool
) -> Search:
    """The search its state file holds, refused when that file is another search's (`mark` differs)."""
    state = read_json(folder / STATE, 16 * MiB, "the search's state file")
    if state.get("fingerprint") != mark:
        raise UserError(
            f"{folder} holds another search (its file, budget=, trials= or key=value differ); "
            "give the search another name: or move the folder"
        )
    found = Search(search, folder, state["settings"], extra, planning.SearchPlan.from_dict(state["plan"]), state)
    found.parallel = parallel
    print(f"search {search.name}: continuing {folder / STATE}", flush=True)
    if not existing:
        _print_plan(search, found.plan, parallel)
    return found


def _print_plan(search: SearchFile, plan: planning.SearchPlan, parallel: int) -> None:
    for line in planning.describe(plan, parallel, search.top * len(search.seeds)):
        print(line, flush=True)


def newest_step(run: Path) -> int:
    """The optimizer step of a run folder's newest complete checkpoint (-1 when none)."""
    folder = run / "checkpoints"
    steps = [int(p.name[len(PREFIX) :]) for p in folder.glob(f"{PREFIX}*") if is_complete(p)] if folder.is_dir() else []
    return max(steps, default=-1)


def _score(run: Path) -> float | None:
    """The last row's validation top-1 of a finished run (None when it is not finite)."""
    rows = (run / "metrics.jsonl").read_text().splitlines()
    score = json.loads(rows[-1]).get("val_top1") if rows else None
    return score if isinstance(score, (int, float)) and math.isfinite(score) else None


def _process(search: Search, args: list[str]) -> tuple[int, str, float]:
    began = time.monotonic()
    out = subprocess.run([*search.python, "train", *args], capture_output=True, text=True)
    if out.returncode in STOPPED or out.returncode < 0:  # a signal: stopped, or killed outright
        raise Preempted(f"a trial was stopped ({last_line(out.stderr)}); the search stops too", None)
    return out.returncode, out.stderr, time.monotonic() - began


def run_trial(search: Search, rung: int, index: int) -> dict[str, Any]:
    """One trial's work at one rung: its trunk trained on to the rung's steps (from where it stands),
    then its cooldown branch; the result as the state file records it."""
    failed, seconds = _train_trunk(search, rung, index)
    if failed:
        return failed
    branch = search.folder / "trials" / f"{name_of(index)}-r{rung}"
    if not (branch / "summary.json").is_file():
        code, err, spent = _train_branch(search, rung, index, branch)
        seconds += spent
        if code != 0:
            return {"status": "failed", "score": None, "error": last_line(err), "seconds": round(seconds, 2)}
    score = _score(branch)
    return {"status": "ok" if score is not None else "failed", "score": score, "seconds": round(seconds, 2)}


def _train_trunk(search: Search, rung: int, index: int) -> tuple[dict[str, Any] | None, float]:
    """The trial's trunk trained on to the rung's steps, from where it stands: the seconds it took, with
    the trial's result when it failed (None when it got there)."""
    name, rungs = name_of(index), search.plan.rungs
    steps, top = rungs[rung].steps, rungs[-1].steps
    trunk = search.folder / "trials" / name
    base = search.args(index)
    seconds = 0.0
    tries = int(search.state["startup_failures"].get(name, 0))
    while newest_step(trunk) < steps:
        pause = steps if steps < top else 0
        code, err, spent = _process(
            search,
            [
                *base,
                f"name={name}",
                f"train.steps={top}",
                "sched.cooldown=0",
                f"train.pause_at_step={pause}",
                "resume=auto",
            ],
        )
        seconds += spent
        if code == 0:
            continue
        if newest_step(trunk) < 0 and "non-finite" not in err:
            tries += 1
            if tries >= STARTUP_TRIES:
                return {
                    "status": "startup",
                    "error": last_line(err),
                    "seconds": round(seconds, 2),
                    "tries": tries,
                }, seconds
            continue
        return {"status": "failed", "score": None, "error": last_line(err), "seconds": round(seconds, 2)}, seconds
    return None, seconds


def _train_branch(search: Search, rung: int, index: int, branch: Path) -> tuple[int, str, float]:
    """The rung's cooldown branch in `branch`: forked from the trunk's checkpoint at the rung's steps, or
    resumed where a run of it had checkpointed; `_process`'s exit code, error text and seconds."""
    r = search.plan.rungs[rung]
    if newest_step(branch) < 0:
        shutil.rmtree(branch, ignore_errors=True)  # a fork killed before its first checkpoint: fork anew
        start = f"resume={search.folder / 'trials' / name_of(index) / 'checkpoints' / step_tag(r.steps)}"
    else:
        start = "resume=auto"
    return _process(
        search,
        [
            *search.args(index),
            f"name={branch.name}",
            f"train.steps={r.steps + r.cooldown}",
            f"sched.cooldown={r.branch_share!r}",
            "train.pause_at_step=0",
            start,
        ],
    )


def ranked(results: dict[str, dict[str, Any]]) -> list[int]:
    """Trial numbers best first: finite scores high to low, then failed ones; ties by trial number."""

    def key(item: tuple[str, dict[str, Any]]) -> tuple[bool, float, int]:
        score = item[1].get("score")
        return (score is None, -(score or 0.0), int(item[0]))

    return [int(k) for k, _ in sorted(results.items(), key=key)]


def entrants(search: Search, rung: int) -> list[int]:
    """The trials a rung scores: all at the first, then those the rung before promoted."""
    return list(range(len(search.settings))) if rung == 0 else search.state["promoted"][str(rung - 1)]


def announce(search: Search, rung: int, todo: list[int]) -> None:
    """The rung's line: its trials, their length, and how many are done already."""
    r, count = search.plan.rungs[rung], len(entrants(search, rung))
    done = f", {count - len(todo)} done already" if len(todo) < count else ""
    print(f"rung {rung}: {count} trial(s) at {r.steps} steps + {r.cooldown} cooldown{done}", flush=True)


def record(search: Search, rung: int, index: int, result: dict[str, Any]) -> None:
    """A trial's result at a rung, into the state file at once; a trial that failed at start-up
    `STARTUP_TRIES` times stops the search."""
    if result["status"] == "startup":
        search.state["startup_failures"][name_of(index)] = result["tries"]
        search.save()
        raise UserError(
            f"trial {index} ({name_of(index)}) failed at start-up {result['tries']} times, the search stops: "
            f"{result['error']}"
        )
    search.state["results"].setdefault(str(rung), {})[str(index)] = result
    search.save()
    score = result.get("score")
    shown = f"val top-1 {score:.2%}" if score is not None else f"failed ({result.get('error', '')})"
    print(f"rung {rung}: trial {index} ({name_of(index)}): {shown}", flush=True)


def decide(search: Search, rung: int) -> None:
    """Promote the best of a finished rung (finite scores only, ties by trial number)."""
    plan, state = search.plan, search.state
    if rung + 1 == len(plan.rungs) or str(rung) in state["promoted"]:
        return
    results = state["results"][str(rung)]
    order = [i for i in ranked(results) if results[str(i)].get("score") is not None]
    if not order:
        raise UserError(f"every trial of rung {rung} failed: {next(iter(results.values())).get('error')}")
    state["promoted"][str(rung)] = order[: plan.rungs[rung + 1].trials]
    search.save()
    print(f"rung {rung}: trials {state['promoted'][str(rung)]} go on", flush=True)


def run_rungs(search: Search) -> None:
    """Every rung in turn, here: its trials' missing results, then its decision, each recorded at once."""
    for rung in range(len(search.plan.rungs)):
        results = search.state["results"].setdefault(str(rung), {})
        todo = [i for i in entrants(search, rung) if str(i) not in results]
        announce(search, rung, todo)
        with concurrent.futures.ThreadPoolExecutor(max_workers=search.parallel) as pool:
            futures = {pool.submit(run_trial, search, rung, i): i for i in todo}
            try:
                for future in concurrent.futures.as_completed(futures):
                    record(search, rung, futures[future], future.result())
            except BaseException:
                for other in futures:
                    other.cancel()
                raise
        decide(search, rung)


def standing(search: Search) -> list[int]:
    """Trial numbers best first: the highest rung reached, then its score."""
    order: list[int] = []
    for rung in reversed(range(len(search.plan.rungs))):
        results = search.state["results"].get(str(rung), {})
        order += [i for i in ranked(results) if i not in order and results[str(i)].get("score") is not None]
    return order


def rerun_top(search: Search) -> None:
    """The `top` settings' whole runs again with each of `seeds`, scored on the test split."""
    top = search.plan.rungs[-1]
    for place, index in enumerate(standing(search)[: search.file.top], start=1):
        name = f"top{place}-{name_of(index)}"
        runs = search.folder / "seeds"
        missing = [s for s in search.file.seeds if not (runs / f"{name}-s{s}" / "summary.json").is_file()]
        if missing:
            print(f"re-running {name_of(index)} with seeds {missing}", flush=True)
            args = [a if not a.startswith("log.dir=") else f"log.dir={runs}" for a in search.args(index)]
            began = time.monotonic()
            out = subprocess.run(
                [
                    *search.python,
                    "train",
                    *args,
                    f"name={name}",
                    f"train.steps={top.steps + top.cooldown}",
                    f"sched.cooldown={top.branch_share!r}",
                    f"seeds={value_text(missing)}",
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode in STOPPED:
                raise Preempted("a seeded re-run was stopped", None)
            spent = search.state["reruns"].setdefault(str(index), {"name": name, "seconds": 0.0})
            spent["seconds"] = round(spent["seconds"] + time.monotonic() - began, 2)
            if out.returncode != 0:
                spent["error"] = last_line(out.stderr)
        scores = []
        for s in search.file.seeds:
            summary = runs / f"{name}-s{s}" / "summary.json"
            if summary.is_file():
                scores.append(read_json(summary, MiB, "summary.json")["final_test_top1"])
        search.state["reruns"].setdefault(str(index), {"name": name, "seconds": 0.0})["test_top1"] = scores
        search.save()


def run(search: Search) -> Path:
    """The whole search here: the rungs, the winner, the seeded re-runs; returns its folder."""
    try:
        run_rungs(search)
    except KeyboardInterrupt:
        raise Preempted("the search was interrupted", None) from None
    return finish(search)


def finish(search: Search) -> Path:
    """The winner (the top rung's best), recorded; the seeded re-runs; the closing line."""
    best = standing(search)[0]
    last = len(search.plan.rungs) - 1
    winner = search.folder / "trials" / f"{name_of(best)}-r{last}"
    search.state["winner"] = {
        "trial": best,
        "setting": search.settings[best],
        "run": str(winner),
        "val_top1": search.state["results"][str(last)][str(best)]["score"],
        "test_top1": read_json(winner / "summary.json", MiB, "summary.json")["final_test_top1"],
    }
    search.save()
    setting = " ".join(f"{k}={value_text(v)}" for k, v in search.settings[best].items())
    print(f"search {search.file.name}: chose trial {best}: {setting}", flush=True)
    rerun_top(search)
    spent = sum(r["seconds"] for rung in search.state["results"].values() for r in rung.values())
    print(
        f"search {search.file.name}: {spent:.0f} s of process time spent of {search.plan.seconds:.0f} s planned "
        f"(budget {budget_text(search.plan.budget_seconds)}); report: cifar100 report {search.folder}",
        flush=True,
    )
    return search.folder
