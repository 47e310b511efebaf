"""A sweep as a real Slurm job array (launch/slurm/sweep.sbatch) on the one-node test cluster of
test_cluster.py: four tiny CPU runs, one task preempted with USR1 and requeued alone, every run
folder complete, and `cifar100 report` grouping them as the sweep file says."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REAL_DATA, clean_environ, run_cmd
from test_cluster import DONE_STATES, SLURM_SH, one_node, rows  # noqa: F401  (one_node: the cluster fixture)

SWEEP = {
    "name": "arr",
    "recipe": "smoke",
    "overrides": {"train.epochs": 3},
    "grid": {"augment.hflip": [0.0, 0.5]},
    "seeds": [0, 1],
}
NAMES = ["arr-augment.hflip=0.0-s0", "arr-augment.hflip=0.0-s1", "arr-augment.hflip=0.5-s0", "arr-augment.hflip=0.5-s1"]


@pytest.mark.slow
def test_sweep_array_task_preempted_is_requeued_alone_and_the_report_groups_the_sweep(one_node):  # noqa: F811
    started = time.monotonic()
    path = one_node.out / "arr.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    array = one_node.sbatch(
        "launch/slurm/sweep.sbatch",
        str(path),
        f"data.root={REAL_DATA}",
        f"log.dir={one_node.out}",
        options=("--array=0-3", "--cpus-per-task=1", f"--output={one_node.out}/%x-%A_%a.out"),
        env={"CPU_PROCS": "1"},
    )
    tasks = [f"{array}_{i}" for i in range(4)]
    runs = [one_node.out / name for name in NAMES]
    deadline = time.monotonic() + 180
    while not (runs[0] / "metrics.jsonl").is_file() or not (runs[0] / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and one_node.job(tasks[0])["JobState"] not in DONE_STATES, one_node.log(
            tasks[0], "cifar100-sweep"
        )[-3000:]
        time.sleep(0.2)
    # Epoch 1 of task 0 is done: what --signal=B:USR1@N sends, to this task's batch shell only. For an array
    # task this Slurm delivers it, then answers "Job can not be altered now" and scancel sends it again
    # every 5 s, which would hit the requeued task before its trap is set: one delivery is what the
    # scheduler sends, so scancel is stopped once the batch shell has said it got the signal. scancel is a child of
    # slurm.sh's shell: its whole process group is killed, or an orphaned scancel goes on re-sending.
    sender = subprocess.Popen(
        [
            "bash",
            str(SLURM_SH),
            "run",
            str(one_node.state),
            "scancel",
            "--signal=USR1",
            "--batch",
            one_node.job(tasks[0])["JobId"],
        ],
        env=clean_environ(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while "USR1 at" not in one_node.log(tasks[0], "cifar100-sweep"):
        assert time.monotonic() < deadline, one_node.log(tasks[0], "cifar100-sweep")[-3000:]
        time.sleep(0.1)
    os.killpg(sender.pid, signal.SIGKILL)
    sender.wait()
    infos = [one_node.wait(task, timeout=300) for task in tasks]
    logs = [one_node.log(task, "cifar100-sweep") for task in tasks]  # one log per task: %x-%A_%a.out
    assert [i["JobState"] for i in infos] == ["COMPLETED"] * 4, [log[-2000:] for log in logs]
    assert [i["Restarts"] for i in infos] == ["1", "0", "0", "0"]  # the preempted task alone was requeued

    first, _, second = logs[0].partition(f"job {tasks[0]} (cifar100-sweep) start 2 ")
    assert f"job {tasks[0]} (cifar100-sweep) start 1 " in first and second, logs[0][-4000:]
    assert "asking the training to checkpoint and stop" in first and f"requeueing job {tasks[0]}" in first
    assert f"run folder {runs[0]} (resuming " in second
    for epoch in range(1, 4):  # no epoch lost, none trained twice
        assert logs[0].count(f"epoch {epoch}/3 |") == 1, logs[0][-4000:]
    for task, log in zip(tasks[1:], logs[1:]):
        assert "start 2" not in log and f"job {task} ended with status 0" in log

    for i, run in enumerate(runs):  # every run folder complete, each the run its task was given
        assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
        assert all((run / f).is_file() for f in ("config.yaml", "summary.json", "loss.png", "accuracy.png"))
        assert (run / "checkpoints" / "last" / "COMPLETE").is_file()
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (config["seed"], config["augment"]["hflip"]) == (i % 2, [0.0, 0.5][i // 2])
        assert config["sweep"] == {"name": "arr", "overrides": [f"augment.hflip={[0.0, 0.5][i // 2]}"]}
        assert json.loads((run / "summary.json").read_text())["epochs"] == 3

    report = run_cmd(
        [sys.executable, "-m", "cifar100", "report", str(one_node.out / "arr-*"), f"out={one_node.out / 'report'}"],
        timeout=120,
    )
    assert report.returncode == 0 and "4 run(s) in 2 column(s)" in report.stdout, report.stderr[-2000:]
    table = (one_node.out / "report" / "report.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| | "))
    assert header == "| | arr: augment.hflip=0.0 (seeds 0, 1) | arr: augment.hflip=0.5 (seeds 0, 1) |"
    final = next(line for line in table.splitlines() if line.startswith("| final top-1"))
    assert len(re.findall(r"\d+\.\d\d ± \d+\.\d\d %", final)) == 2  # seeds as mean ± std
    print(f"sweep array of 4, one task preempted and requeued: {time.monotonic() - started:.0f} s")
