"""A search on Slurm: one job array per rung, and the controller's next job held until it has ended.

The controller runs as a job (launch/slurm/tune.sbatch). Each of its jobs reads the state file,
records what the rung's array left (each task writes its trial's result beside its run folders,
`trials/tNN-rR.result.json`; only the controller writes the state file), decides, and submits the
next array (launch/slurm/tune-trial.sbatch, one task per trial) and, with `--dependency=afterany`
on it, its own next job; then it exits. A task that left no result (killed, preempted, its node
lost) is submitted again and its trial continues from its checkpoints, `STARTUP_TRIES` times at most.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from cifar100.commands.tune.controller import (
    STARTUP_TRIES,
    Search,
    announce,
    decide,
    entrants,
    finish,
    name_of,
    record,
    run_trial,
)
from cifar100.errors import UserError
from cifar100.runfolder.safe_files import MiB, read_json, write_atomic

TRIAL_SCRIPT = "launch/slurm/tune-trial.sbatch"
CONTROLLER_SCRIPT = "launch/slurm/tune.sbatch"


def result_file(search: Search, rung: int, index: int) -> Path:
    """Where an array task leaves its trial's result at a rung."""
    return search.folder / "trials" / f"{name_of(index)}-r{rung}.result.json"


def run_task(search: Search, rung: int, index: int) -> None:
    """One array task: a trial's work at a rung, its result written beside its run folders."""
    if rung >= len(search.plan.rungs) or index not in entrants(search, rung):
        raise UserError(f"rung={rung} trial={index}: not a trial of that rung of {search.folder}")
    write_atomic(result_file(search, rung, index), json.dumps(run_trial(search, rung, index)).encode())


def sbatch(args: list[str]) -> str:
    """Submit; the job id (an array's job id)."""
    try:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        raise UserError(f"sbatch did not run: {err}") from None
    if out.returncode != 0:
        raise UserError(f"sbatch {' '.join(args[:3])} ... failed: {out.stderr.strip()[-300:]}")
    return out.stdout.strip().split(";")[0]


def step(search: Search, command: list[str], options: str) -> bool:
    """One controller job: record what the last array left, decide, and submit the next array and
    the next controller job; True once every rung is done (the caller then finishes the search)."""
    state = search.state
    tries = state.setdefault("slurm", {"arrays": [], "submitted": {}})
    for rung in range(len(search.plan.rungs)):
        results = state["results"].setdefault(str(rung), {})
        todo = []
        for index in entrants(search, rung):
            if str(index) in results:
                continue
            found = result_file(search, rung, index)
            if found.is_file():
                record(search, rung, index, read_json(found, MiB, "a task's result"))
            else:
                todo.append(index)
        announce(search, rung, todo)
        if todo:
            for index in todo:
                key = f"{rung}:{index}"
                tries["submitted"][key] = tries["submitted"].get(key, 0) + 1
                if tries["submitted"][key] > STARTUP_TRIES:
                    search.save()
                    raise UserError(
                        f"trial {index} ({name_of(index)}) left no result in {STARTUP_TRIES} array tasks of rung "
                        f"{rung}, the search stops: see its task logs"
                    )
            extra = shlex.split(options)
            array = sbatch([f"--array={','.join(map(str, todo))}", *extra, TRIAL_SCRIPT, *command, f"rung={rung}"])
            controller = sbatch([f"--dependency=afterany:{array}", *extra, CONTROLLER_SCRIPT, *command])
            tries["arrays"].append({"rung": rung, "array": array, "trials": todo, "controller": controller})
            search.save()
            print(f"rung {rung}: array {array} (tasks {todo}); the controller goes on as job {controller}", flush=True)
            return False
        decide(search, rung)
    return True


def run_controller(search: Search, command: list[str], options: str) -> Path | None:
    """The controller's job: one step, and the search's finish once every rung is done."""
    return finish(search) if step(search, command, options) else None
