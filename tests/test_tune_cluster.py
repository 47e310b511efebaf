"""A search on the real one-node Slurm of test_cluster.py: launch/slurm/tune.sbatch's controller
submits one array per rung (launch/slurm/tune-trial.sbatch) and its next job after each, and the
last one finishes the search."""

from __future__ import annotations

import json
import time

import pytest
from conftest import REAL_DATA
from test_cluster import DONE_STATES, one_node  # noqa: F401  (one_node: the cluster fixture)


@pytest.mark.slow
def test_search_runs_one_array_per_rung_and_the_controller_after_each(one_node):  # noqa: F811
    options = f"--gpus-per-node=0 --cpus-per-task=1 --output={one_node.out}/%x-%j.out"
    first = one_node.sbatch(
        "launch/slurm/tune.sbatch",
        "sweeps/tune-smoke.yaml",
        "budget=2m",
        f"data.root={REAL_DATA}",
        f"log.dir={one_node.out}",
        f"sbatch={options}",
        options=("--cpus-per-task=1",),
    )
    path = one_node.out / "tune-smoke" / "tune.json"
    deadline, controller = time.monotonic() + 1200, first
    while True:
        state = json.loads(path.read_text()) if path.is_file() else {}
        arrays = state.get("slurm", {}).get("arrays", [])
        controller = arrays[-1]["controller"] if arrays else first
        info = one_node.job(controller)
        if info["JobState"] in DONE_STATES and (state.get("winner") or info["JobState"] != "COMPLETED"):
            break
        assert time.monotonic() < deadline, one_node.log(controller, "cifar100-tune")[-3000:]
        time.sleep(2)
    assert info["JobState"] == "COMPLETED" and state.get("winner"), one_node.log(controller, "cifar100-tune")[-3000:]
    assert [(a["rung"], a["trials"]) for a in arrays] == [(0, [0, 1, 2]), (1, state["promoted"]["0"])]
    for array in arrays:
        for task in array["trials"]:
            assert one_node.job(f"{array['array']}_{task}")["JobState"] == "COMPLETED"
    assert len(state["results"]["0"]) == 3 and len(state["results"]["1"]) == 1
    assert len(state["reruns"][str(state["winner"]["trial"])]["test_top1"]) == 1
