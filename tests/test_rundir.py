"""One run folder, one writer: the lock, resume=PATH of another run (a fork), impossible files, a
world size that changed mid-epoch, and a full disk, each with real processes and real files.

A finished smoke run (3 epochs, a checkpoint every 3 steps: step-00000021 is mid-epoch 3,
step-00000024 its end) is both the source the tests resume from and the numbers they must end with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fill, overridden, run_cmd, shared_folder
from test_resume import DDP_ENV, ONE, TWO, finish, metrics, start, wait_for
from test_resume import args as resume_args

from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import save_checkpoint
from cifar100.runfolder.rundir import Located, adopt, lock
from cifar100.runfolder.tracking import append_metrics, plot_run, write_run_file

EPOCH_3_STEP_5 = "step-00000021"
ROW = {
    "epoch": 1,
    "lr": 0.1,
    "train_loss": 4.6,
    "train_top1": 0.01,
    "test_loss": 4.6,
    "test_top1": 0.01,
    "test_top5": 0.05,
}
META = {"epoch": 2, "step_in_epoch": 0, "global_step": 4, "config": {}, "totals": {"epochs_done": 1}}


def args(real_data, log_dir, name, *extra):
    # resume=auto from the start: a later resume=auto of the same run then has the same config.yaml.
    return resume_args(real_data, log_dir, name, *overridden(["resume=auto"], extra))


@pytest.fixture(scope="session")
def finished(real_data, tmp_path_factory) -> Path:
    """A finished run `A`, never changed by a test (they copy it); trained once per session."""
    return shared_folder(tmp_path_factory, "rundir-finished", lambda log: finish(ONE, args(real_data, log, "A"))) / "A"


def copy_run(finished: Path, log_dir: Path, name: str = "A") -> Path:
    shutil.copytree(finished, log_dir / name, symlinks=True)
    return log_dir / name


def contents(folder: Path) -> dict[str, object]:
    """Every file's bytes and every link's target under `folder`: what "untouched" compares (the lock
    file names its last holder, which a refused run may have been)."""
    return {
        str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
        if p.name != ".lock"
    }


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_lock_refuses_a_second_writer_in_one_line(tmp_path):
    lock(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path} is in use by process {os.getpid()} on "):
        lock(tmp_path)  # a second open file of the same folder, as a second process has


@pytest.mark.slow
def test_a_second_run_on_a_running_folder_is_refused_and_kill_9_frees_it(tmp_path, real_data, finished):
    first = start(ONE, args(real_data, tmp_path, "L"))
    wait_for(tmp_path / "L" / "checkpoints" / "step-00000003" / "COMPLETE", first)
    # Held in epoch 1 (alive, the folder's lock still its own) while the second starts: on a loaded machine
    # the second process's start-up alone can outlast the first run's remaining seconds.
    os.killpg(first.pid, signal.SIGSTOP)
    second = run_cmd([*ONE, *args(real_data, tmp_path, "L")])
    assert second.returncode == 2, second.stderr[-3000:]
    line = one_error_line(second.stderr)
    assert line == (
        f"error: {tmp_path / 'L'} is in use by process {first.pid} on {os.uname().nodename}: a run folder "
        "has one writer at a time; wait for that run to end, or give this one another name="
    )
    os.killpg(first.pid, signal.SIGKILL)  # the kernel drops the lock with the process
    first.wait()
    finish(ONE, args(real_data, tmp_path, "L"))
    assert metrics(tmp_path / "L") == metrics(finished)  # every epoch once, the uninterrupted numbers


@pytest.mark.slow
def test_resume_path_of_another_run_forks_it_and_leaves_it_untouched(tmp_path, real_data, finished):
    source = copy_run(finished, tmp_path)
    before = contents(source)
    out = finish(ONE, args(real_data, tmp_path, "B", f"resume={source / 'checkpoints' / EPOCH_3_STEP_5}"))
    assert f"resuming {source / 'checkpoints' / EPOCH_3_STEP_5} at epoch 3, batch 5, a fork of {source}" in out.stdout
    assert contents(source) == before  # no byte of A changed, nothing moved aside
    fork = tmp_path / "B"
    assert metrics(fork) == metrics(finished)  # epochs 1-2 copied, epoch 3 finished from the checkpoint
    assert "name: B\n" in (fork / "config.yaml").read_text()
    assert json.loads((fork / "summary.json").read_text())["final_test_top1"] == metrics(finished)[-1]["test_top1"]
    # the checkpoint it forked (and the best weights, from epoch 1) are its own copies
    assert (fork / "checkpoints" / EPOCH_3_STEP_5 / "COMPLETE").is_file()
    assert os.readlink(fork / "checkpoints" / "best") == os.readlink(source / "checkpoints" / "best")
    assert not list(fork.rglob(".tmp*")) and not (fork / "checkpoints" / "abandoned").exists()


@pytest.mark.slow
def test_a_refused_resume_changes_nothing(tmp_path, real_data, finished):
    """Going back to an older checkpoint of the same run, with a config it was not made with."""
    source = copy_run(finished, tmp_path)
    before = contents(source)
    out = run_cmd(
        [
            *ONE,
            *args(real_data, tmp_path, "A", f"resume={source / 'checkpoints' / EPOCH_3_STEP_5}", "optim.momentum=0.5"),
        ]
    )
    assert out.returncode == 2 and "checkpoint was made with another config" in one_error_line(out.stderr)
    assert contents(source) == before


@pytest.mark.slow
@pytest.mark.parametrize("meta", ["[]", "negative"])
def test_a_newest_checkpoint_of_the_wrong_shape_is_skipped_and_nothing_is_lost(tmp_path, real_data, finished, meta):
    run = copy_run(finished, tmp_path)
    path = run / "checkpoints" / "step-00000024" / "meta.json"
    saved = json.loads(path.read_text())
    saved["totals"]["epochs_done"] = -3
    path.write_text("[]" if meta == "[]" else json.dumps(saved))
    out = finish(ONE, args(real_data, tmp_path, "A"))
    assert f"warning: skipping checkpoint step-00000024: {path}: unreadable (" in out.stderr
    assert f"resuming {run / 'checkpoints' / EPOCH_3_STEP_5}" in out.stdout
    assert metrics(run) == metrics(finished)


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_by_resume_and_report(tmp_path, real_data, finished):
    run = copy_run(finished, tmp_path)
    (run / "checkpoints" / "step-00000024").rename(run / "checkpoints" / "gone")  # killed mid-epoch 3 ...
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(rows[:2]) + rows[2][:50])  # ... while appending epoch 3
    report = run_cmd([sys.executable, "-m", "cifar100", "report", str(run), f"out={tmp_path / 'report'}"])
    assert report.returncode == 0 and "dropped the last line, cut short or malformed" in report.stderr
    out = finish(ONE, args(real_data, tmp_path, "A"))
    assert out.stderr.count("dropped the last line") == 1
    assert metrics(run) == metrics(finished)


@pytest.mark.slow
def test_report_skips_a_run_whose_files_are_malformed_with_a_note(tmp_path, finished):
    good = copy_run(finished, tmp_path, "good")
    broken = copy_run(finished, tmp_path, "shape")
    (broken / "summary.json").write_text("[]")
    rows = copy_run(finished, tmp_path, "rows")
    (rows / "metrics.jsonl").write_text("{}\n" + (rows / "metrics.jsonl").read_text())
    out = run_cmd(
        [sys.executable, "-m", "cifar100", "report", str(good), str(broken), str(rows), f"out={tmp_path / 'report'}"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"skipped {broken / 'summary.json'}: unreadable (expected an object, found list)" in out.stdout
    assert f"skipped {rows / 'metrics.jsonl'}: line 1 unreadable (epoch is None, not an epoch number)" in out.stdout
    assert "1 run(s) in 1 column(s)" in out.stdout


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_of_one_process_is_refused_on_two(tmp_path, real_data, finished):
    run = copy_run(finished, tmp_path)
    # At an epoch end a changed world size is allowed: the finished run's last checkpoint loads on two.
    at_end = finish(TWO, args(real_data, tmp_path, "A"), DDP_ENV)
    assert "resuming on 2 processes instead of 1" in at_end.stderr
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    shutil.rmtree(run / "checkpoints" / "step-00000024")  # the newest is now mid-epoch 3
    out = run_cmd([*TWO, *args(real_data, tmp_path, "A")], env=DDP_ENV)
    assert out.returncode != 0 and "exitcode  : 2" in out.stderr  # torchrun's report of the failed process
    ours = [line for line in out.stderr.splitlines() if line.startswith("error: ")]  # torchrun adds its own report
    assert ours == [
        f"error: {run / 'checkpoints' / EPOCH_3_STEP_5}: a mid-epoch checkpoint of 1 process(es) cannot "
        "continue on 2: resume it with 1, or from an epoch-end checkpoint"
    ], out.stderr[-3000:]
    assert "cifar100/" not in out.stderr  # no traceback from our code
    assert metrics(run) == metrics(finished)


def assert_nothing_temporary(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name], sorted(folder.rglob("*"))


def test_every_write_on_a_full_disk_is_one_line_and_leaves_the_old_file(small_disk):
    metrics_file = small_disk / "metrics.jsonl"
    row = ROW | {"epoch_seconds": 1.0, "images_per_second": 400.0}
    lines = [json.dumps(row | {"epoch": e}) + "\n" for e in range(1, 40)]
    metrics_file.write_text("".join(lines[: 4000 // len(lines[-1])]))  # ends within its first 4 KiB block
    write_run_file(small_disk / "summary.json", "{}\n")
    plot_run([row], small_disk, "full")
    saved = contents(small_disk)
    fill(small_disk)
    # A row that starts in the file's last block and does not end there: written in part, then cut back.
    with pytest.raises(
        UserError,
        match=r"metrics.jsonl: not written \(No space left on device\); the run stops here: "
        r"free space, then continue with the same command plus resume=auto",
    ):
        append_metrics(metrics_file, row | {"epoch": 99, "padding": "x" * 200})
    with pytest.raises(UserError, match=r"summary.json: not written \(No space left on device\)"):
        write_run_file(small_disk / "summary.json", json.dumps({"final_test_top1": 0.5}) + "\n" * 5000)
    with pytest.warns(UserWarning, match=r"loss.png and accuracy.png not updated \(No space left on device\)"):
        assert plot_run([row, row | {"epoch": 2}], small_disk, "full") == []
    with pytest.raises(OSError):
        save_checkpoint(small_disk / "checkpoints", "step-00000001", {}, {}, {"padding": "x" * 100000})
    (small_disk / "filler").unlink()
    assert contents(small_disk) == saved | {"checkpoints": None}  # every file as before
    assert_nothing_temporary(small_disk)


@pytest.mark.slow
def test_a_run_on_a_disk_that_fills_stops_in_one_line_and_resume_auto_finishes(small_disk, real_data, finished):
    proc = start(ONE, args(real_data, small_disk, "full"))
    wait_for(small_disk / "full" / "checkpoints" / "step-00000003" / "COMPLETE", proc)
    filler = fill(small_disk)  # the disk fills during epoch 1
    _, err = proc.communicate(timeout=300)
    assert "not saved (No space left on device); the previous checkpoint (step-00000003) is intact" in err, err[-3000:]
    assert proc.returncode == 2 and one_error_line(err) == (
        f"error: {small_disk / 'full' / 'metrics.jsonl'}: not written (No space left on device); the run stops here: "
        "free space, then continue with the same command plus resume=auto"
    )
    assert_nothing_temporary(small_disk)
    filler.unlink()
    out = finish(ONE, args(real_data, small_disk, "full"))
    assert f"resuming {small_disk / 'full' / 'checkpoints' / 'step-00000003'}" in out.stdout
    assert metrics(small_disk / "full") == metrics(finished)
    assert json.loads((small_disk / "full" / "summary.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_a_summary_that_does_not_fit_is_written_by_resume_auto_later(small_disk, real_data, finished):
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    run = copy_run(finished, small_disk)
    (run / "summary.json").unlink()
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(finished.parent), str(small_disk)))  # as if it ran here
    filler = fill(small_disk)
    out = run_cmd([*ONE, *args(real_data, small_disk, "A")])
    assert out.returncode == 2 and one_error_line(out.stderr).startswith(
        f"error: {run / 'summary.json'}: not written (No space left on device); the run stops here"
    )
    assert_nothing_temporary(small_disk)
    filler.unlink()
    finish(ONE, args(real_data, small_disk, "A"))
    assert json.loads((run / "summary.json").read_text()) | {"wall_seconds": 0} == json.loads(
        (finished / "summary.json").read_text()
    ) | {"wall_seconds": 0}


def test_a_fork_copies_a_checkpoints_files_and_nothing_odd_beside_them(tmp_path):
    source = tmp_path / "A"
    ckpt = save_checkpoint(source / "checkpoints", "step-00000004", {"w": torch.zeros(2)}, {"optimizer": {}}, META)
    (source / "config.yaml").write_text("name: A\n")
    (source / "metrics.jsonl").write_text(json.dumps(ROW) + "\n")
    os.mkfifo(ckpt / "pipe")  # copied, it would hang the fork
    (ckpt / "everything").symlink_to("/")  # copied, it would copy the whole disk
    began = time.monotonic()
    adopted = adopt(Located(None, ckpt, fork_of=source), str(tmp_path), "F", epochs_done=1)
    assert time.monotonic() - began < 5 and adopted.forked
    copied = tmp_path / "F" / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in copied.iterdir()) == ["COMPLETE", "meta.json", "model.safetensors", "train_state.pt"]
    assert [r["epoch"] for r in adopted.rows] == [1]
