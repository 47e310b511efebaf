"""What a hostile or careless user types or leaves in files, met as they meet it (issue 22): each case
ends in one short `error:` line or works, with no traceback, no folder half made and nothing of an
existing run changed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cmd
from test_resume import ONE, finish, metrics
from test_rundir import EPOCH_3_STEP_5, contents, copy_run, finished  # noqa: F401 (a fixture)

from cifar100.config import parse_yaml
from cifar100.errors import UserError
from cifar100.runfolder.rundir import lock
from cifar100.runfolder.tracking import append_metrics, write_run_file

CLI = (sys.executable, "-m", "cifar100")


def one_line(out, most: int = 1000) -> str:
    """The single `error:` line a refusal prints (exit 2), short, and no traceback."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) <= most, out.stderr[-3000:]
    return errors[0]


def refused(*args: str, env: dict[str, str] | None = None, most: int = 1000, seconds: float = 60) -> str:
    began = time.monotonic()
    out = run_cmd([*CLI, *args], env=env, timeout=120)
    assert time.monotonic() - began < seconds, f"{args[:2]} took {time.monotonic() - began:.0f} s"
    return one_line(out, most)


def test_yaml_that_would_exhaust_the_stack_or_memory_is_refused_in_one_short_line(tmp_path):
    laughs = ["base: smoke", "a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in "bcdefgh":  # 10^8 values once expanded, from 400 bytes
        laughs.append(f"{level}: &{level} [{', '.join([f'*{chr(ord(level) - 1)}'] * 10)}]")
    (tmp_path / "laughs.yaml").write_text("\n".join([*laughs, "optim:", "  lr: *h"]) + "\n")
    (tmp_path / "cycle.yaml").write_text("base: smoke\noptim:\n  lr: &a [*a]\n")
    (tmp_path / "deep.yaml").write_text("base: smoke\ndescription: " + "[" * 400 + "]" * 400 + "\n")
    for i in range(60):  # a base: chain longer than MAX_BASES
        (tmp_path / f"r{i}.yaml").write_text(f"base: r{i + 1}.yaml\n" if i < 59 else "base: smoke\n")
    cases = {
        "laughs.yaml": "more than 100000 values once its aliases are expanded",
        "cycle.yaml": "an alias refers to a collection that holds it",
        "deep.yaml": "nested deeper than 50 levels",
        "r0.yaml": "more than 32 recipes in one base: chain",
    }
    for name, reason in cases.items():
        assert reason in refused("show", f"recipe={tmp_path / name}", most=300, seconds=15)
    line = refused("show", "recipe=smoke", "augment.mean=" + "[" * 300 + "]" * 300, most=300)
    assert line == "error: augment.mean: nested deeper than 50 levels"


def test_an_error_quotes_at_most_a_few_hundred_characters_of_a_value():
    for arg in ("optim.lr=" + "x" * 100_000, "name=" + "n" * 5000, "optim." + "k" * 5000 + "=1", "x" * 9000):
        line = refused("show", "recipe=smoke", arg, most=600)
        assert "…" in line or "..." in line


def test_command_line_values_are_yaml_1_2_core_and_each_key_is_given_once(tmp_path):
    assert "train.epochs='1:30': expected int" in refused("show", "recipe=smoke", "train.epochs=1:30")
    assert "train.epochs='1_000': expected int" in refused("show", "recipe=smoke", "train.epochs=1_000")
    assert refused("show", "recipe=smoke", "optim.lr=0.1", "optim.lr=0.2") == (
        "error: optim.lr=0.1 and optim.lr=0.2: optim.lr is given twice on the command line; give it once"
    )
    assert "augment.cutmix is given twice" in refused(
        "show", "recipe=smoke", "augment.cutmix={prob: 1}", "augment.cutmix.prob=0.5"
    )
    assert "recipe= is given twice" in refused("show", "recipe=smoke", "recipe=best")
    assert "seeds= is given twice" in refused("train", "recipe=smoke", "seeds=[0]", "seeds=[1]")
    # A text that reads as a number in either YAML is written quoted, so it reads back as typed.
    shown = run_cmd([*CLI, "show", "recipe=smoke", "name=1e5", "description=1:30", "log.dir=0o17"])
    for loaded in (yaml.safe_load(shown.stdout), parse_yaml(shown.stdout)):
        assert (loaded["name"], loaded["description"], loaded["log"]["dir"]) == ("1e5", "1:30", "0o17")


def test_integers_on_the_command_line_are_ascii_digits(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nrecipe: smoke\ngrid: {optim.lr: [0.1, 0.2]}\n")
    assert (
        refused("sweep", str(sweep), "task=²")
        == "error: task='²': expected a whole number, written with the digits 0-9"
    )
    assert "task='1_0'" in refused("sweep", str(sweep), "task=1_0")
    assert "steps='١٢'" in refused("bench", "step", "recipe=smoke", "steps=١٢")
    assert "seeds=" in refused("train", "recipe=smoke", "seeds=[1_0]")
    assert "seed='١': expected int" in refused("show", "recipe=smoke", "seed=١")


def test_run_names_are_what_every_consumer_takes_literally(tmp_path):
    for name in ("a$$b", "with space", "<b>x</b>", "-x", "a\nb", "x" * 201):
        line = refused("train", "recipe=smoke", f"log.dir={tmp_path}", f"name={name}", "resume=auto", seconds=15)
        assert "must name one folder inside log.dir: letters, digits and . _ - + = , @" in line
    assert not any(tmp_path.iterdir())
    # what the project itself makes of names stays inside the rule: a sweep's runs, seeds, `-2` suffixes
    shown = run_cmd([*CLI, "show", "recipe=smoke", "name=s-optim.lr=0.1-augment.mean=0.5,0.5,0.5-s1@x+2"])
    assert shown.returncode == 0, shown.stderr


def test_wandb_environment_wins_over_the_recipe_and_the_command_line_over_it(tmp_path):
    def wandb(*args: str, **env: str) -> dict:
        out = run_cmd([*CLI, "show", "recipe=smoke", *args], env=env)
        assert out.returncode == 0, out.stderr
        return yaml.safe_load(out.stdout)["log"]["wandb"]

    assert wandb()["mode"] == "disabled"  # the smoke recipe's
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "p", "WANDB_ENTITY": "team", "WANDB_DIR": str(tmp_path)}
    assert wandb(**env) == {"mode": "offline", "project": "p", "entity": "team", "dir": str(tmp_path)}
    assert wandb("log.wandb.mode=disabled", "log.wandb.project=q", **env) == {
        "mode": "disabled",
        "project": "q",
        "entity": "team",
        "dir": str(tmp_path),
    }
    assert wandb(WANDB_MODE="dryrun")["mode"] == "offline"  # W&B's older name
    assert refused("show", "recipe=smoke", env={"WANDB_MODE": "sometimes"}) == (
        "error: WANDB_MODE='sometimes' (in the environment): expected online, offline, disabled"
    )


def test_a_sweep_over_the_size_limit_is_refused_at_once(tmp_path):
    sweep = tmp_path / "huge.yaml"
    grid = {k: [0.1 * i for i in range(1, 11)] for k in ("optim.lr", "optim.momentum", "optim.weight_decay")}
    grid |= {"augment.hflip": [0.0, 0.5, 1.0], "augment.vflip": [0.0, 0.5, 1.0]}
    sweep.write_text(
        yaml.safe_dump({"name": "huge", "recipe": "smoke", "grid": grid, "seeds": [0, 1]}, sort_keys=False)
    )
    assert refused("sweep", str(sweep), seconds=10) == (
        f"error: {sweep}: 18000 runs (1 override set(s) x 10 x 10 x 10 x 3 x 3 grid values x 2 seed(s)); "
        "a sweep holds at most 1000: split it into several files"
    )


def test_no_file_of_a_run_folder_is_written_through_a_symbolic_link(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(outside)
    with pytest.raises(UserError, match=r"\.lock: a symbolic link; the project never writes through one"):
        lock(run)
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(UserError, match=r"metrics\.jsonl: a symbolic link"):
        append_metrics(run / "metrics.jsonl", {"epoch": 1})
    (run / ".summary.json.tmp").symlink_to(outside)  # a link planted where the atomic write builds its file
    (run / "config.yaml").symlink_to(outside)
    write_run_file(run / "summary.json", "{}\n")
    write_run_file(run / "config.yaml", "name: run\n")
    assert outside.read_text() == "precious\n"
    assert (run / "summary.json").read_text() == "{}\n" and not (run / "config.yaml").is_symlink()
    os.mkfifo(run / "fifo")
    with pytest.raises(UserError, match="fifo: a FIFO; the project never writes through one"):
        append_metrics(run / "fifo", {"epoch": 1})


@pytest.mark.slow
def test_a_model_that_cannot_take_32x32_images_is_refused_before_the_data_loads(tmp_path):
    for model in ("vit_tiny_patch16_224",):  # levit, swin, mixer, inception_v3: the same dry forward
        line = refused(
            "train",
            "recipe=smoke",
            f"model.name={model}",
            "model.cifar_stem=false",
            f"data.root={tmp_path / 'no-data'}",  # were the data loaded first, the error would say it is missing
            "data.download=false",
            f"log.dir={tmp_path / 'runs'}",
            seconds=90,
        )
        assert line.startswith(f"error: model.name={model}, made for 224x224 images, cannot take CIFAR's 32x32")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_unreadable_checkpoints_never_cost_a_run_its_history(tmp_path, real_data, finished):  # noqa: F811
    run = copy_run(finished, tmp_path)
    for weights in (run / "checkpoints").glob("step-*/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    before = contents(run)
    argv = ["recipe=smoke", f"data.root={real_data}", f"log.dir={tmp_path}", "name=A", "train.epochs=3"]
    line = one_line(run_cmd([*ONE, *argv, "train.checkpoint_every_steps=3", "resume=auto"]))
    assert line.startswith(
        f"error: {run} holds 3 epoch(s) of metrics.jsonl, summary.json, best weights, but no checkpoint of it loads "
        "(step-00000024: "
    )
    assert "nothing was changed: continue from a checkpoint that loads with resume=PATH, or start anew" in line
    assert contents(run) == before


@pytest.mark.slow
def test_a_checkpoint_set_aside_can_be_forked_or_is_refused_before_a_folder_exists(tmp_path, real_data, finished):  # noqa: F811
    run = copy_run(finished, tmp_path)
    argv = ["recipe=smoke", f"data.root={real_data}", f"log.dir={tmp_path}", "train.epochs=3"]
    argv.append("train.checkpoint_every_steps=3")
    finish(ONE, [*argv, "name=A", f"resume={run / 'checkpoints' / EPOCH_3_STEP_5}"])  # back to mid-epoch 3
    aside = run / "checkpoints" / "abandoned" / f"after-{EPOCH_3_STEP_5}"
    out = finish(ONE, [*argv, "name=F", f"resume={aside / 'step-00000024'}"])
    assert f"a fork of {run}" in out.stdout
    assert metrics(tmp_path / "F") == metrics(finished)
    before = contents(run)
    line = one_line(run_cmd([*ONE, *argv, "name=A", f"resume={aside / 'step-00000024'}"]))
    assert "a checkpoint set aside when this run went back to an older one" in line
    (aside / "metrics.jsonl").unlink()  # as an abandoned checkpoint of an older version was left
    line = one_line(run_cmd([*ONE, *argv, "name=G", f"resume={aside / 'step-00000024'}"]))
    assert "a fork copies the metrics of the 3 epoch(s) its checkpoint has done" in line
    kept = str(aside.relative_to(run) / "metrics.jsonl")
    assert contents(run) == {k: v for k, v in before.items() if k != kept} and not (tmp_path / "G").exists()


@pytest.mark.slow
def test_every_folder_name_the_project_makes_passes_to_report_and_eval(tmp_path, real_data, finished):  # noqa: F811
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "recipe": "smoke", "grid": {"optim.lr": [0.1, 0.2]}}))
    log = tmp_path / "my runs"  # a space in the path as well
    for name in ("s-optim.lr=0.1", "s-optim.lr=0.2"):
        copy_run(finished, log, name)  # finished already: `sweep run` skips them and prints the report command
    out = run_cmd([*CLI, "sweep", str(sweep), "run", f"log.dir={log}", f"data.root={real_data}"])
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout.strip().splitlines()[-1].partition("compare them: ")[2]
    command = shlex.split(printed.replace("cifar100", f"{shlex.quote(sys.executable)} -m cifar100", 1))
    report = run_cmd(command, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})  # its report/ lands there
    assert report.returncode == 0 and "2 run(s)" in report.stdout, report.stderr[-3000:]
    glob = run_cmd([*CLI, "report", f"{log}/s-optim.lr=*", f"out={tmp_path / 'globbed'}"])
    assert glob.returncode == 0 and "2 run(s)" in glob.stdout, glob.stderr[-3000:]
    # names a user may give a folder by hand: plots, report.md and report.html take them literally
    hostile = ("a$$b", "<img src=x onerror=alert(1)>", "x[1]")
    for name in hostile:
        copy_run(finished, log, name)
    out = run_cmd([*CLI, "report", *(str(log / n) for n in hostile), f"out={tmp_path / 'r'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "<" not in re.sub(r"(`+).*?\1", "", md) and "### &lt;img src=x onerror=alert(1)&gt;" in md
    assert f"`{log / 'a$$b'}`" in md and "](runs/x%5B1%5D/loss.png)" in md
    evaluated = run_cmd([*CLI, "eval", f"run={log / 'a$$b'}", f"data.root={real_data}"], cwd=ROOT)
    assert evaluated.returncode == 0 and (log / "a$$b" / "eval-best-confusion.png").is_file(), evaluated.stderr[-3000:]
    shutil.rmtree(log)


NO_LINK = "a symbolic link, not a folder; nothing is written through one: remove it and run again"


def plant(run: Path, name: str, kind: str) -> None:
    """Replace `run/name` by a hostile file: a FIFO, a link to /dev/zero, or a line of 200 MB."""
    (run / name).unlink()
    if kind == "fifo":
        os.mkfifo(run / name)
    elif kind == "zero":
        (run / name).symlink_to("/dev/zero")
    else:
        with open(run / name, "wb") as file:  # one line, no newline: what a runaway writer leaves
            for _ in range(200):
                file.write(b"9" * 2**20)


def edited(run: Path, name: str, change) -> None:
    path = run / name
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        change(rows)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))


@pytest.mark.slow
def test_report_reads_only_regular_files_within_bounds_and_notes_each_odd_one(tmp_path, exported_run):
    runs = tmp_path / "runs"
    cases = {
        "fifo": (lambda r: plant(r, "metrics.jsonl", "fifo"), "metrics.jsonl: a FIFO, not a metrics file"),
        "zero": (lambda r: plant(r, "metrics.jsonl", "zero"), "metrics.jsonl: a character device, not a metrics file"),
        "long": (lambda r: plant(r, "metrics.jsonl", "long"), "metrics.jsonl: 200 MiB, more than the 64 MiB"),
        "huge": (
            lambda r: edited(r, "metrics.jsonl", lambda rows: rows[0].update(test_top1=1e308) or rows.append(rows[0])),
            "metrics.jsonl: line 1 unreadable (test_top1 is 1e+308, not an accuracy from 0 to 1)",
        ),
        "time": (
            lambda r: edited(r, "summary.json", lambda s: s.update(wall_seconds=1e308)),
            "summary.json: unreadable (wall_seconds is 1e+308, more than 1e+09)",
        ),
        "config-fifo": (lambda r: plant(r, "config.yaml", "fifo"), "config.yaml: a FIFO, not a run's config"),
        "config-empty": (lambda r: (r / "config.yaml").write_text(""), "config.yaml: holds no config"),
        "config-list": (
            lambda r: (r / "config.yaml").write_text("- 1\n"),
            "config.yaml: a run's config must be a mapping",
        ),
        "summary-fifo": (lambda r: plant(r, "summary.json", "fifo"), "summary.json: a FIFO, not a run's summary"),
    }
    for name, (make, _) in cases.items():
        make(copy_run(exported_run, runs, name))
    copy_run(exported_run, runs, "good")
    began = time.monotonic()
    out = run_cmd([*CLI, "report", *sorted(str(p) for p in runs.iterdir()), f"out={tmp_path / 'report'}"])
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - began < 120
    for name, (_, note) in cases.items():
        assert f"skipped {runs / name}/{note}" in out.stdout, (name, out.stdout)
    assert "1 run(s) in 1 column(s)" in out.stdout
    (runs / "long" / "metrics.jsonl").unlink()


@pytest.mark.slow
def test_eval_export_and_resume_take_odd_run_files_in_one_line(tmp_path, real_data, finished):  # noqa: F811
    run = copy_run(finished, tmp_path)
    plant(run, "metrics.jsonl", "fifo")
    argv = ["recipe=smoke", f"data.root={real_data}", f"log.dir={tmp_path}", "name=A", "train.epochs=3"]
    line = refused("train", *argv, "train.checkpoint_every_steps=3", "resume=auto", seconds=90)
    assert line == f"error: {run / 'metrics.jsonl'}: a FIFO, not a metrics file; it is not read"
    meta = run / "checkpoints" / "best" / "meta.json"
    original = meta.read_text()
    plant(meta.parent, "meta.json", "fifo")
    line = refused("eval", f"run={run}", f"data.root={real_data}", seconds=60)
    assert line == f"error: {meta}: a FIFO, not a checkpoint's meta.json; it is not read"
    meta.unlink()
    meta.write_text(original)
    edited(meta.parent, "meta.json", lambda m: m["config"].update(model=5))
    line = refused("eval", f"run={run}", f"data.root={real_data}", seconds=60)
    assert line.startswith(f"error: {meta}: its config is not one this version can use (model must be a mapping")
    meta.write_text(original)
    out = run_cmd([*CLI, "export", f"run={run}", "format=onnx"], timeout=300)  # its metrics file is still a FIFO
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "export" / "A-best.json").read_text())["test_top1"] is None


@pytest.mark.slow
def test_export_writes_through_no_link_and_removes_nothing_of_the_users(tmp_path, exported_run):
    run = copy_run(exported_run, tmp_path, "tiny")
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    for planted in (".tiny-best.tmp.onnx", ".tiny-best.tmp.json", ".tiny-best.probe"):  # older exporters' names
        (run / "export" / planted).symlink_to(outside)
    out = run_cmd([*CLI, "export", f"run={run}", "format=onnx"], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert outside.read_text() == "precious\n"
    assert sorted(p.name for p in (run / "export").iterdir()) == sorted(
        [
            ".tiny-best.tmp.onnx",
            ".tiny-best.tmp.json",
            ".tiny-best.probe",
            "tiny-best.onnx",
            "tiny-best.pt2",
            "tiny-best.json",
        ]
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run / "export")
    (run / "export").symlink_to(elsewhere)
    line = refused("export", f"run={run}", "format=onnx", seconds=120)
    assert line == f"error: {run / 'export'}: {NO_LINK}"
    assert list(elsewhere.iterdir()) == []


def test_report_writes_through_no_link_and_nowhere_in_a_run_folder(tmp_path, exported_run, capsys):
    from cifar100.cli import main

    run = copy_run(exported_run, tmp_path / "runs", "tiny")
    before = contents(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs").symlink_to(elsewhere)
    (out / "report.md").symlink_to(run / "summary.json")  # replaced by the report, never written through
    assert main(["report", str(run), f"out={out}"]) == 2
    assert capsys.readouterr().err == f"error: {out / 'runs'}: {NO_LINK}\n"
    (out / "runs").unlink()
    assert main(["report", str(run), f"out={out}"]) == 0
    assert not (out / "report.md").is_symlink() and list(elsewhere.iterdir()) == []
    for target in (run, run / "checkpoints", tmp_path):  # tmp_path: its runs/tiny/ would be the run's own plots
        assert main(["report", str(run), f"out={target}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: out=") and f"inside the run folder {run}" in err, err
    assert contents(run) == before
