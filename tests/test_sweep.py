"""Sweep files (cifar100/sweep.py, `cifar100 sweep`): expansion, names, one-line errors, sweep.sbatch's
dry run, the W&B agent's argument list, and a sweep trained here, stopped, continued and reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, clean_environ, run_cmd

from cifar100.cli import main
from cifar100.commands.report import find_runs, group_runs
from cifar100.commands.sweep import load_sweep, task_args
from cifar100.config import load_config, to_dict


def write(tmp_path: Path, spec: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_runs_are_the_set_list_times_the_grid_times_the_seeds(tmp_path):
    path = write(
        tmp_path,
        {
            "name": "g",
            "recipe": "smoke",
            "overrides": {"train.epochs": 3},
            "runs": [{}, {"model.act": "relu"}],
            "grid": {"optim.lr": [0.1, 0.2]},
            "seeds": [0, 1],
        },
    )
    sweep = load_sweep(path, ["data.root=/d"])
    assert [r.name for r in sweep.runs] == [
        "g-optim.lr=0.1-s0",
        "g-optim.lr=0.1-s1",
        "g-optim.lr=0.2-s0",
        "g-optim.lr=0.2-s1",
        "g-model.act=relu-optim.lr=0.1-s0",
        "g-model.act=relu-optim.lr=0.1-s1",
        "g-model.act=relu-optim.lr=0.2-s0",
        "g-model.act=relu-optim.lr=0.2-s1",
    ]
    run = sweep.runs[5]
    assert run.args == (
        "recipe=smoke",
        "train.epochs=3",
        "model.act=relu",
        "optim.lr=0.1",
        "data.root=/d",
        "seed=1",
        "name=g-model.act=relu-optim.lr=0.1-s1",
        "sweep.name=g",
        "sweep.overrides=[model.act=relu, optim.lr=0.1]",
    )
    c = run.config
    assert (c.name, c.seed, c.model.act, c.optim.lr, c.train.epochs, c.data.root) == (run.name, 1, "relu", 0.1, 3, "/d")
    assert (c.sweep.name, c.sweep.overrides) == ("g", ("model.act=relu", "optim.lr=0.1"))
    # task I's arguments, exactly as sweep.sbatch reads them (one per line)
    assert task_args(sweep, "5") == run.args
    # A name depends on the run's own values only: another value in the grid leaves it as it was.
    grown = write(
        tmp_path,
        {
            "name": "g",
            "recipe": "smoke",
            "overrides": {"train.epochs": 3},
            "runs": [{}, {"model.act": "relu"}],
            "grid": {"optim.lr": [0.05, 0.1, 0.2]},
            "seeds": [0, 1],
        },
        "grown.yaml",
    )
    assert {r.name for r in sweep.runs} < {r.name for r in load_sweep(grown, []).runs}


def test_values_round_trip_and_names_stay_one_path_component(tmp_path):
    path = write(
        tmp_path,
        {
            "name": "v",
            "recipe": "smoke",
            "grid": {
                "augment.mean": [[0.5, 0.5, 0.5], [0.4, 0.4, 0.4]],
                "optim.weight_decay": [5e-4],
                "model.act": [None, "mish"],
            },
        },
    )
    sweep = load_sweep(path, [])
    assert [r.name for r in sweep.runs] == [
        "v-augment.mean=0.5,0.5,0.5-model.act=null",
        "v-augment.mean=0.5,0.5,0.5-model.act=mish",
        "v-augment.mean=0.4,0.4,0.4-model.act=null",
        "v-augment.mean=0.4,0.4,0.4-model.act=mish",
    ]
    assert all("/" not in r.name for r in sweep.runs)
    first = sweep.runs[0].config
    assert first.augment.mean == (0.5, 0.5, 0.5) and first.model.act is None and first.optim.weight_decay == 5e-4
    assert "optim.weight_decay=0.0005" in sweep.runs[0].args  # one value: fixed, not in the name


def test_a_list_entry_that_sets_nothing_is_the_base_run(tmp_path):
    sweep = load_sweep(write(tmp_path, {"name": "b", "recipe": "smoke", "runs": [{}, {"augment.vflip": 0.5}]}), [])
    assert [(r.name, r.own) for r in sweep.runs] == [("b-base", ()), ("b-augment.vflip=0.5", ("augment.vflip=0.5",))]
    seeds_only = load_sweep(write(tmp_path, {"name": "r", "recipe": "smoke", "seeds": [3, 4]}, "r.yaml"), [])
    assert [r.name for r in seeds_only.runs] == ["r-s3", "r-s4"]


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"grid": {"optim.lrr": [0.1, 0.2]}},
            "run 0 (e-optim.lrr=0.1): unknown config key 'optim.lrr'; did you mean optim.lr?",
        ),
        (
            {"grid": {"optim.name": ["sgd", "sgdd"]}},
            "run 1 (e-optim.name=sgdd): optim.name='sgdd': expected one of sgd, adam, nadam, adamw",
        ),
        (
            {"runs": [{}, {"train.epochs": "many"}]},
            "run 1 (e-train.epochs=many): train.epochs='many': expected int, got str",
        ),
        ({"grid": {}}, "grid: empty; give each key a list of values"),
        ({"grid": {"optim.lr": []}}, "grid: optim.lr: expected a non-empty list of values"),
        (
            {"runs": [{"optim.lr": 0.1}, {"optim.lr": 0.2}, {"optim.lr": 0.1}]},
            "runs 0 and 2 are both named e-optim.lr=0.1",
        ),
        ({"runs": [{}, {}]}, "runs 0 and 1 are both named e: the same override set twice?"),
        ({"runs": [{"optim.lr": 0.1}], "grid": {"optim.lr": [0.2, 0.3]}}, "optim.lr is both in runs and in grid"),
        ({"grids": {"optim.lr": [0.1]}}, "unknown sweep key 'grids'; did you mean grid?"),
        ({"seeds": [0, 0]}, "seeds: expected a list of distinct whole numbers"),
        ({"grid": {"seed": [0, 1]}}, "seed: list the seeds as seeds: [...]"),
        ({"runs": [{"name": "x"}]}, "name cannot be set in a sweep"),
        ({"runs": [{"recipe": "exp9"}]}, "run 0 (e): unknown recipe 'exp9'"),
    ],
)
def test_a_bad_sweep_is_one_line_and_exit_2(tmp_path, capsys, spec, message):
    path = write(tmp_path, {"name": "e", "recipe": "smoke", **spec})
    assert main(["sweep", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith(f"error: {path}: "), out.err
    assert message in out.err, out.err


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, cli):
    path = write(tmp_path, {"name": "c", "recipe": "smoke", "grid": {"optim.lr": [0.1, 0.2]}})
    for args, message in (
        ((str(path), "optim.lr=0.3"), "optim.lr=... given on the command line, but the sweep"),
        ((str(path), "task=2"), "task=2: the sweep " + str(path) + " has 2 runs, tasks 0-1"),
        ((str(path), "name=x"), "name=x: the sweep file"),
        ((str(path), "run", "task=0"), "give run (train every run here) or task=I"),
        ((str(tmp_path / "none.yaml"),), "cannot read the sweep file"),
        ((), "usage: cifar100 sweep FILE"),
    ):
        out = cli("sweep", *args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, (args, out.stderr)
    wandb_file = cli("sweep", "sweeps/wandb/side.yaml")
    assert wandb_file.returncode == 2 and "this is a W&B Sweeps config: start it with `wandb sweep" in wandb_file.stderr


def test_listing_names_every_run_and_the_array_to_submit(tmp_path, cli):
    path = write(tmp_path, {"name": "l", "recipe": "smoke", "grid": {"optim.lr": [0.1, 0.2]}, "seeds": [0, 1, 2]})
    out = cli("sweep", str(path), "data.root=/d")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["0", "l-optim.lr=0.1-s0", "optim.lr=0.1"]
    assert lines[5].split() == ["5", "l-optim.lr=0.2-s2", "optim.lr=0.2"]
    assert f"sbatch --array=0-5 launch/slurm/sweep.sbatch {path}" in out.stdout
    task = cli("sweep", str(path), "task=4", "data.root=/d")
    assert task.stdout.splitlines() == [
        "recipe=smoke",
        "optim.lr=0.2",
        "data.root=/d",
        "seed=1",
        "name=l-optim.lr=0.2-s1",
        "sweep.name=l",
        "sweep.overrides=[optim.lr=0.2]",
    ]


def test_shipped_sweeps_check_and_say_what_they_run():
    side = load_sweep(ROOT / "sweeps" / "side.yaml", [])
    assert [r.name for r in side.runs] == [
        "side-base",
        "side-augment.color_jitter=0.4",
        "side-augment.vflip=0.5",
        "side-sched.name=step-sched.step_epochs=60-sched.gamma=0.2",
        "side-sched.name=plateau-sched.gamma=0.1-sched.patience=10",
    ]
    best = load_config("best", [])
    for run in side.runs:  # each differs from best in its own keys only
        c = run.config
        assert (c.model, c.optim, c.train, c.data) == (best.model, best.optim, best.train, best.data)
    assert side.runs[1].config.augment.color_jitter == 0.4 and side.runs[2].config.augment.vflip == 0.5
    assert [r.config.sched.name for r in side.runs] == ["cosine", "cosine", "cosine", "step", "plateau"]
    tabled = load_sweep(ROOT / "sweeps" / "tabled.yaml", [])
    assert [(r.config.recipe, r.config.seed) for r in tabled.runs] == [
        (recipe, seed) for recipe in ("exp1", "exp2", "exp3", "best") for seed in (0, 1, 2)
    ]
    assert tabled.runs[0].config.optim == load_config("exp1", []).optim


def test_sweep_sbatch_dry_run_prints_the_array_and_each_task(tmp_path):
    path = write(tmp_path, {"name": "d", "recipe": "smoke", "grid": {"optim.lr": [0.1, 0.2]}, "seeds": [0, 1]})
    env = {"SLURM_JOB_NAME": "", "CPU_PROCS": "2"}
    out = run_cmd(["bash", "launch/slurm/sweep.sbatch", "--dry-run", str(path), "data.root=/d"], env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"4 tasks: sbatch --array=0-3 launch/slurm/sweep.sbatch {path} data.root=/d" in out.stdout
    tasks = out.stdout.split("task ")[1:5]
    assert [t.split(":")[0] for t in tasks] == ["0", "1", "2", "3"]
    assert "world size 2: 1 node(s) x 2 process(es) on cpu" in tasks[3] and "per-process batch 25 " in tasks[3]
    assert (
        # the task's own name= replaces the job's (a key given twice is refused)
        "train.py resume=auto recipe=smoke optim.lr=0.2 data.root=/d seed=1 name=d-optim.lr=0.2-s1 sweep.name=d"
    ) in tasks[3]
    bad = write(tmp_path, {"name": "d", "recipe": "smoke", "grid": {"optim.lr": [0.1, "x"]}}, "bad.yaml")
    out = run_cmd(["bash", "launch/slurm/sweep.sbatch", "--dry-run", str(bad)], env=env, timeout=60)
    assert out.returncode == 2 and out.stdout == "" and "run 1 (d-optim.lr=x): optim.lr='x'" in out.stderr


def test_the_wandb_agents_exact_arguments_are_accepted_by_train(capsys):
    """sweeps/wandb/side.yaml: the command wandb's agent builds for every grid point, with wandb's own code."""
    from wandb.sdk.launch.sweeps.utils import (
        create_sweep_command,
        create_sweep_command_args,
    )

    config = yaml.safe_load((ROOT / "sweeps" / "wandb" / "side.yaml").read_text())
    names = list(config["parameters"])
    points = [{}]
    for name in names:
        points = [{**p, name: v} for p in points for v in config["parameters"][name]["values"]]
    assert len(points) == 12
    for point in points:
        # as wandb_agent.Agent._command_run: the macros replaced by these lists, the rest kept
        sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
        sweep_vars.update(interpreter=["python"], program=[config["program"]], env=["/usr/bin/env"])
        command = []
        for chunk in create_sweep_command(list(config["command"])):
            command += sweep_vars.get(chunk[2:-1]) or [] if chunk.startswith("${") else [chunk]
        assert command[:5] == ["/usr/bin/env", "python", "train.py", "recipe=best", "log.wandb.mode=online"]
        assert command[5:] == [f"{k}={v}" for k, v in point.items()]  # e.g. augment.color_jitter=0.4
        assert main(["show", *command[3:]]) == 0  # train.py's own parsing and validation (cli.split_args, load_config)
        shown = yaml.safe_load(capsys.readouterr().out)
        assert (shown["augment"]["color_jitter"], shown["augment"]["vflip"], shown["sched"]["name"]) == (
            point["augment.color_jitter"],
            point["augment.vflip"],
            point["sched.name"],
        )
        assert shown["log"]["wandb"]["mode"] == "online" and shown["model"]["name"] == "seresnet50"


def test_wandb_groups_a_sweeps_runs_by_its_name_with_the_overrides_in_the_config(tmp_path, wandb_in_process):
    from accelerate import Accelerator

    from cifar100.runfolder.tracking import start_wandb

    run = load_sweep(ROOT / "sweeps" / "side.yaml", []).runs[3]
    accelerator = Accelerator(cpu=True, log_with="wandb")
    start_wandb(accelerator, "cifar100-tests", None, "offline", tmp_path, run.name, to_dict(run.config))
    try:
        wandb_run = accelerator.get_tracker("wandb", unwrap=True)
        assert wandb_run.group == "side" and wandb_run.name == run.name
        assert wandb_run.config["sweep"]["overrides"] == ["sched.name=step", "sched.step_epochs=60", "sched.gamma=0.2"]
        assert wandb_run.config["sched"]["name"] == "step"
    finally:
        accelerator.end_training()


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sweep_run_here_skips_finished_runs_continues_a_stopped_one_and_reports(tmp_path, real_data):
    path = write(
        tmp_path,
        {"name": "here", "recipe": "smoke", "overrides": {"train.epochs": 2}, "grid": {"augment.hflip": [0.0, 0.5]}},
    )
    command = [
        sys.executable,
        "-m",
        "cifar100",
        "sweep",
        str(path),
        "run",
        f"data.root={real_data}",
        f"log.dir={tmp_path / 'runs'}",
    ]
    first, second = tmp_path / "runs" / "here-augment.hflip=0.0", tmp_path / "runs" / "here-augment.hflip=0.5"
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**clean_environ(), "PYTHONUNBUFFERED": "1"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (first / "metrics.jsonl").is_file() or not (first / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # a stop after epoch 1 of run 0: checkpoint, exit 143
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "preempted: stopped by SIGTERM" in err, err[-3000:]
    assert not (first / "summary.json").exists() and not second.exists()

    again = run_cmd(command, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run folder {first} (resuming " in again.stdout and f"run folder {second} (new run)" in again.stdout
    for run in (first, second):
        assert [r["epoch"] for r in rows(run)] == [1, 2] and (run / "summary.json").is_file()
    assert f"compare them: cifar100 report {first} {second}" in again.stdout.replace("'", "")

    done = run_cmd(command, timeout=120)
    assert done.returncode == 0 and done.stdout.count("finished already, skipped") == 2, done.stdout

    columns = group_runs(find_runs([str(tmp_path / "runs" / "*")])[0])
    assert [c.label for c in columns] == ["here: augment.hflip=0.0 (seed 0)", "here: augment.hflip=0.5 (seed 0)"]
