"""Preemption and faults with real processes: kill -9, signals, NaN, corrupt or foreign checkpoints, a full disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clean_environ, overridden, run_cmd, shared_folder
from test_records import GOOD_META, GOOD_STATE

from cifar100.config import ModelConfig
from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import (
    apply_weights,
    find_latest,
    load_train_state,
    load_weights,
    read_meta,
    save_checkpoint,
)
from cifar100.training.models import build_model

pytestmark = pytest.mark.slow

COMPARED = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "test_loss",
    "test_top1",
    "test_top5",
    "ema_test_loss",
    "ema_test_top1",
    "ema_test_top5",
)
ONE = (sys.executable, "train.py")
TWO = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py")
DDP_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def args(real_data, log_dir, name, *extra):
    return overridden(
        [
            "recipe=smoke",
            f"data.root={real_data}",
            f"log.dir={log_dir}",
            f"name={name}",
            "train.epochs=3",
            "train.checkpoint_every_steps=3",
        ],
        extra,
    )


def metrics(run: Path) -> list[dict]:
    return [
        {k: r[k] for k in COMPARED if k in r} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    ]


def start(launcher, argv, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [*launcher, *argv],
        cwd=ROOT,
        env={**clean_environ(), "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def kill_9(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every worker's: torchrun starts each worker in a
    session of its own, so killing the launcher's group alone would leave the workers training."""
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, workers):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # not a group leader (a one-process launch's loader worker), or gone: the launcher's group has it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in map(int, workers):  # orphans are reaped by init; wait until they are gone
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text(errors="ignore"):
            assert time.monotonic() < deadline, f"worker {pid} outlived SIGKILL"
            time.sleep(0.05)


def finish(launcher, argv, env=None):
    out = run_cmd([*launcher, *argv], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


DEVICE = ("data.pipeline=device", "augment.autoaugment=cifar10")
# launcher, arguments, env; the one-process run keeps every checkpoint, for a test to go back to one of them
BASELINES = {1: (ONE, ("train.keep_last=10",), None), 2: (TWO, (), DDP_ENV), "device": (ONE, DEVICE, None)}


class Baselines(dict):
    """Metrics of the uninterrupted runs (one process, two, the device pipeline) to compare every resumed
    run against: each trained the first time a test of the session asks for it."""

    def __init__(self, real_data: Path, tmp_path_factory: pytest.TempPathFactory):
        super().__init__()
        self.real_data, self.tmp_path_factory = real_data, tmp_path_factory

    def folder(self, key) -> Path:
        """The run folder of baseline `key` (for reading or copying only)."""
        launcher, extra, env = BASELINES[key]
        log = shared_folder(
            self.tmp_path_factory,
            f"resume-baseline-{key}",
            lambda log: finish(launcher, args(self.real_data, log, "run", *extra), env),
        )
        return log / "run"

    def __missing__(self, key):
        self[key] = metrics(self.folder(key))
        return self[key]


@pytest.fixture(scope="session")
def baselines(real_data, tmp_path_factory):
    return Baselines(real_data, tmp_path_factory)


@pytest.mark.parametrize(
    "world, step, pipeline", [(1, 12, "reference"), (1, 16, "reference"), (2, 12, "reference"), (1, 12, "device")]
)
def test_kill_9_anywhere_then_resume_auto_is_exact(tmp_path, real_data, baselines, world, step, pipeline):
    """Step 12 is mid-epoch 2 (8 batches per epoch); step 16 is the end of epoch 2."""
    launcher, env = (ONE, None) if world == 1 else (TWO, DDP_ENV)
    extra = DEVICE if pipeline == "device" else ()
    proc = start(launcher, args(real_data, tmp_path, "r1", *extra), env)
    wait_for(tmp_path / "r1" / "checkpoints" / f"step-{step:08d}" / "COMPLETE", proc)
    kill_9(proc)
    out = finish(launcher, args(real_data, tmp_path, "r1", "resume=auto", *extra), env)
    assert "resuming" in out.stdout
    baseline = baselines["device" if pipeline == "device" else world]
    assert metrics(tmp_path / "r1") == baseline  # no epoch lost, none duplicated, same numbers
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert summary["final_test_top1"] == baseline[-1]["test_top1"] and summary["epochs"] == 3
    assert summary["images_per_rank"] == [1200 // world] * world


EMA = ("train.ema.enabled=true", "train.ema.decay=0.9", "train.ema.select=ema")


@pytest.mark.parametrize("options, batch", [(("train.grad_accum=2",), 8), (("train.compile=true", *EMA), 4)])
def test_kill_9_then_resume_is_exact_with_accumulation_or_compile(tmp_path, real_data, options, batch):
    """Accumulation: step 12 counts optimizer steps, so it is micro-batch 8 of epoch 2. Compile:
    checkpoints hold the uncompiled module's weights (and its average); the resumed run compiles
    the same graph again."""
    finish(ONE, args(real_data, tmp_path, "whole", *options))
    proc = start(ONE, args(real_data, tmp_path, "r", *options))
    wait_for(tmp_path / "r" / "checkpoints" / "step-00000012" / "COMPLETE", proc, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = finish(ONE, args(real_data, tmp_path, "r", "resume=auto", *options))
    assert f"at epoch 2, batch {batch})" in out.stdout
    assert metrics(tmp_path / "r") == metrics(tmp_path / "whole")


@pytest.mark.parametrize("world", [1, 2])
def test_kill_9_mid_epoch_with_weight_averaging_then_resume_is_exact(tmp_path, real_data, world):
    """The averaged weights travel in every checkpoint: killed in epoch 2 (step 12) and resumed, the
    run's EMA metrics, and the best weights they pick, are those of the uninterrupted run. Under
    DDP every rank averages the same synced weights and rank 0's norm statistics."""
    launcher, env = (ONE, None) if world == 1 else (TWO, DDP_ENV)
    finish(launcher, args(real_data, tmp_path, "whole", *EMA), env)
    proc = start(launcher, args(real_data, tmp_path, "r", *EMA), env)
    wait_for(tmp_path / "r" / "checkpoints" / "step-00000012" / "COMPLETE", proc)
    kill_9(proc)
    out = finish(launcher, args(real_data, tmp_path, "r", "resume=auto", *EMA), env)
    assert re.search(r"at epoch [23], batch [1-7]\)", out.stdout), out.stdout[out.stdout.index("run folder") :][:400]
    resumed, whole = metrics(tmp_path / "r"), metrics(tmp_path / "whole")
    assert resumed == whole and all("ema_test_top1" in row for row in resumed)
    assert [r["ema_test_top1"] for r in resumed] != [r["test_top1"] for r in resumed]  # another set of weights
    best = tmp_path / "r" / "checkpoints" / "best"
    assert read_meta(best)["weights"] == "ema" and read_meta(best)["epoch"] == read_meta(best.parent / "last")[
        "epoch"
    ] - (len(whole) - max(whole, key=lambda r: r["ema_test_top1"])["epoch"])
    mine, theirs = load_weights(best), load_weights(tmp_path / "whole" / "checkpoints" / "best")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


SPEEDRUN = (
    "augment.hflip=alternating",
    "data.sizes=[[16,0.3],[24,0.3],[32,0.4]]",
    "model.init=dirac",
    "optim.name=muon",
    "optim.lookahead.steps=5",
)


@pytest.mark.parametrize(
    "options",
    [("data.pipeline=device", "train.micro_batch=20", *EMA), ("data.pipeline=reference",)],
    ids=["device-ema-micro", "reference"],
)
def test_kill_9_mid_epoch_with_the_speedrun_keys_then_resume_is_exact(tmp_path, real_data, options):
    """Alternating flips, progressive resizing (its phases change inside epochs 1 and 2), dirac init,
    Muon with SGD and Lookahead (step 12 falls between two slow updates): killed at step 12 and
    resumed, the run's metrics are those of the uninterrupted run."""
    options = (*SPEEDRUN, *options)
    finish(ONE, args(real_data, tmp_path, "whole", *options))
    proc = start(ONE, args(real_data, tmp_path, "r", *options))
    wait_for(tmp_path / "r" / "checkpoints" / "step-00000012" / "COMPLETE", proc)
    kill_9(proc)
    out = finish(ONE, args(real_data, tmp_path, "r", "resume=auto", *options))
    assert "resuming" in out.stdout
    assert metrics(tmp_path / "r") == metrics(tmp_path / "whole")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_for_requeue(tmp_path, real_data, baselines, sig):
    proc = start(ONE, args(real_data, tmp_path, "s", "train.checkpoint_every_steps=0"))
    wait_for(tmp_path / "s" / "checkpoints" / "step-00000008" / "COMPLETE", proc)  # end of epoch 1
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert f"preempted: stopped by {sig.name}" in err and "resume=auto" in err
    finish(ONE, args(real_data, tmp_path, "s", "resume=auto"))
    assert metrics(tmp_path / "s") == baselines[1]


def test_sigterm_to_torchrun_stops_both_ranks_with_a_checkpoint_and_resumes_exactly(tmp_path, real_data, baselines):
    """The launcher row of the README's signal table: torchrun forwards SIGTERM to its workers, both
    agree on the step, rank 0 writes the checkpoint before either exits, and the run continues."""
    proc = start(TWO, args(real_data, tmp_path, "tr", "train.checkpoint_every_steps=0"), DDP_ENV)
    wait_for(tmp_path / "tr" / "checkpoints" / "step-00000008" / "COMPLETE", proc)  # end of epoch 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "preempted: stopped by SIGTERM" in err, (proc.returncode, err[-3000:])
    last = (tmp_path / "tr" / "checkpoints" / "last").resolve()
    assert (last / "COMPLETE").is_file() and last.name > "step-00000008"
    finish(TWO, args(real_data, tmp_path, "tr", "resume=auto", "train.checkpoint_every_steps=0"), DDP_ENV)
    assert metrics(tmp_path / "tr") == baselines[2]


def test_second_signal_exits_at_once(tmp_path, real_data):
    # One slow step (a wider model on a 400-image batch) so both signals land inside it.
    proc = start(
        ONE,
        args(
            real_data,
            tmp_path,
            "s2",
            "train.epochs=20",
            "model.name=cifarnet_l",
            "data.batch_size=400",
            "train.checkpoint_every_steps=0",
        ),
    )
    wait_for(tmp_path / "s2" / "checkpoints" / "best" / "COMPLETE", proc)
    time.sleep(0.2)  # inside epoch 2's only step, which takes over a second
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.6)  # later than a launcher's duplicate copy would come
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "preempted:" not in err  # no clean-up path ran
    assert sorted(p.name for p in (tmp_path / "s2" / "checkpoints").glob("step-*")) == ["step-00000001"]


def test_non_finite_loss_stops_with_one_line_or_skips(tmp_path, real_data):
    out = run_cmd([*ONE, *args(real_data, tmp_path, "nan", "optim.lr=1e8")])
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss at epoch 1, step ") and ", lr " in last
    assert "Last good checkpoint: " in last and "Traceback" not in out.stderr
    skip = run_cmd([*ONE, *args(real_data, tmp_path, "nan2", "optim.lr=1e8", "train.max_bad_steps=2")])
    assert skip.returncode == 2
    assert skip.stderr.count("step skipped") == 2 and "(2 of train.max_bad_steps=2)" in skip.stderr


def test_checkpoints_after_skipped_steps_hold_finite_norm_statistics(tmp_path, real_data):
    """A skipped step's forward pass can make BatchNorm's running statistics NaN; no checkpoint keeps them."""
    out = run_cmd(
        [
            *ONE,
            *args(
                real_data,
                tmp_path,
                "skips",
                "optim.lr=1e8",
                "train.max_bad_steps=50",
                "train.checkpoint_every_steps=1",
                "train.keep_last=100",
                "train.epochs=1",
            ),
        ]
    )
    assert out.returncode == 0 and out.stderr.count("step skipped") >= 3, out.stderr[-2000:]
    checkpoints = sorted((tmp_path / "skips" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 8
    for path in checkpoints:
        stats = {k: v for k, v in load_weights(path).items() if "running_" in k}
        assert stats and all(torch.isfinite(v).all() for v in stats.values()), path.name


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, real_data, baselines):
    proc = start(ONE, args(real_data, tmp_path, "c"))
    wait_for(tmp_path / "c" / "checkpoints" / "step-00000012" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    newest = tmp_path / "c" / "checkpoints" / "step-00000012" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    out = finish(ONE, args(real_data, tmp_path, "c", "resume=auto"))
    assert "skipping checkpoint step-00000012" in out.stderr
    assert "resuming" in out.stdout and "step-00000009" in out.stdout
    assert metrics(tmp_path / "c") == baselines[1]


def test_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path, real_data):
    proc = start(ONE, args(real_data, tmp_path, "cfg"))
    wait_for(tmp_path / "cfg" / "checkpoints" / "step-00000003" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = run_cmd([*ONE, *args(real_data, tmp_path, "cfg", "resume=auto", "optim.momentum=0.5", "model.act=relu")])
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "model.act: 'mish' -> 'relu'" in out.stderr and "optim.momentum: 0.9 -> 0.5" in out.stderr
    # The recovery the non-finite-loss error suggests is allowed, and said to change the run.
    out = finish(ONE, args(real_data, tmp_path, "cfg", "resume=auto", "optim.lr=0.1"))
    assert "optim.lr: 0.2 -> 0.1: the run continues, but is no longer the uninterrupted run" in out.stderr


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(tmp_path, real_data, baselines):
    shutil.copytree(baselines.folder(1), tmp_path / "old", symlinks=True)  # a finished run, every checkpoint kept
    ckpts = tmp_path / "old" / "checkpoints"
    out = finish(ONE, args(real_data, tmp_path, "old", f"resume={ckpts / 'step-00000009'}"))
    assert "resuming" in out.stdout and "moved to" in out.stderr
    assert metrics(tmp_path / "old") == baselines[1]  # epochs 2 and 3 again, the same numbers
    assert (ckpts / "abandoned" / "after-step-00000009" / "step-00000024").is_dir()
    assert (ckpts / "step-00000024").is_dir()  # made again by the resumed run
    weights_only = run_cmd([*ONE, *args(real_data, tmp_path, "old", f"resume={ckpts / 'best'}")])
    assert weights_only.returncode == 2 and "holds weights only" in weights_only.stderr


class Payload:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_train_state_with_foreign_objects_is_refused(tmp_path):
    model = build_model(ModelConfig(name="cifarnet_tiny", act=None, cifar_stem=True), 100)
    path = save_checkpoint(tmp_path, "step-00000001", model.state_dict(), {"optimizer": Payload()}, GOOD_META)
    with pytest.raises(UserError, match="refused, it holds objects other than tensors"):
        load_train_state(path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    with pytest.warns(UserWarning, match="skipping checkpoint step-00000001"):
        assert find_latest(tmp_path) is None


def test_weights_of_another_model_list_the_mismatched_keys(tmp_path):
    tiny = build_model(ModelConfig(name="cifarnet_tiny", act=None, cifar_stem=True), 100)
    small = build_model(ModelConfig(name="cifarnet_s", act=None, cifar_stem=True), 100)
    with pytest.raises(UserError, match=r"does not fit this model \(shape differs: blocks\.0\.bn1\.bias, "):
        apply_weights(small, tiny.state_dict(), tmp_path)
    other = build_model(ModelConfig(name="resnet18", act=None, cifar_stem=True), 100)
    with pytest.raises(UserError, match=r"missing: .*unexpected: "):
        apply_weights(other, tiny.state_dict(), tmp_path)


def test_full_disk_keeps_the_previous_checkpoint_loadable(small_disk, real_data):
    out = run_cmd([*ONE, *args(real_data, small_disk, "full", "train.keep_last=5", "train.epochs=4")])
    assert "not saved (No space left on device); the previous checkpoint" in out.stderr, out.stderr[-2000:]
    found = find_latest(small_disk / "full" / "checkpoints")
    assert found is not None and found[0].name.startswith("step-")
    model = build_model(ModelConfig(name="cifarnet_tiny", act="mish", cifar_stem=True), 100)
    apply_weights(model, found[1], found[0])
    assert not list((small_disk / "full" / "checkpoints").glob(".tmp-*"))  # no half-written folder left


def test_wandb_run_is_resumed_by_its_saved_id(tmp_path, real_data, baselines):
    wandb_args = ("log.wandb.mode=offline", "train.checkpoint_every_steps=0")
    proc = start(ONE, args(real_data, tmp_path, "wb", *wandb_args), {"WANDB_SILENT": "true"})
    wait_for(tmp_path / "wb" / "checkpoints" / "step-00000008" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # W&B's service (wandb-core --pid <client>) runs in its own session and notices its client's
    # death a moment later; until then it holds the run id, as it would on a real node.
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", f"wandb-core .*--pid {proc.pid}$"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "wandb-core outlived its killed client by a minute"
        time.sleep(0.5)
    out = finish(ONE, args(real_data, tmp_path, "wb", "resume=auto", *wandb_args), {"WANDB_SILENT": "true"})
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]
    # One command uploads both starts; wandb syncs the folders of one run id in order of start.
    assert f"to upload it: wandb sync {runs[0]} {runs[1]}\n" in out.stdout
    assert metrics(tmp_path / "wb") == baselines[1]


def test_unreadable_meta_skips_to_the_previous_checkpoint(tmp_path):
    model = build_model(ModelConfig(name="cifarnet_tiny", act=None, cifar_stem=True), 100)
    for step in (1, 2):
        save_checkpoint(tmp_path, f"step-{step:08d}", model.state_dict(), GOOD_STATE, GOOD_META)
    (tmp_path / "step-00000002" / "meta.json").write_text("{ truncated")
    with pytest.warns(UserWarning, match="skipping checkpoint step-00000002"):
        assert find_latest(tmp_path)[0].name == "step-00000001"


def test_a_checkpoint_that_resume_auto_finds_is_read_once(tmp_path, monkeypatch):
    from cifar100.runfolder import checkpoint, resume

    model = build_model(ModelConfig(name="cifarnet_tiny", act=None, cifar_stem=True), 100)
    save_checkpoint(tmp_path / "r" / "checkpoints", "step-00000003", model.state_dict(), GOOD_STATE, GOOD_META)
    reads = []
    for name in ("load_weights", "load_train_state"):
        real = getattr(checkpoint, name)
        monkeypatch.setattr(checkpoint, name, lambda path, real=real, name=name: reads.append(name) or real(path))
    found = resume.start_point("auto", str(tmp_path), "r")
    loaded = resume.load(found.checkpoint, {}, found.read)
    assert found.checkpoint.name == "step-00000003" and sorted(reads) == ["load_train_state", "load_weights"]
    assert loaded.weights.keys() == model.state_dict().keys()
