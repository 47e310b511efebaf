"""What tune builds on the WSD schedule: a run paused at a step and resumed, lengthened, or forked
into a cooldown branch goes on exactly as one uninterrupted run of the new length."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cmd
from safetensors.torch import load_file


def _run(real_data: Path, log: Path, name: str, *extra: str) -> Path:
    out = run_cmd(
        [
            sys.executable,
            "train.py",
            "recipe=smoke",
            f"data.root={real_data}",
            f"log.dir={log}",
            f"name={name}",
            "sched.name=wsd",
            "data.val_size=100",  # held out before train_limit takes 400 training images: 8 steps an epoch
            *extra,
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return log / name


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def _rows(run: Path) -> list[dict]:
    keep = ("epoch", "lr", "train_loss", "val_top1", "test_top1")
    return [{k: r[k] for k in keep} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_paused_trunk_resumed_or_branched_equals_uninterrupted_runs(tmp_path, real_data):
    # The trunk: 20 constant-rate steps, paused mid-epoch at step 9 and at an epoch's end at step 16.
    trunk = _run(real_data, tmp_path, "trunk", "train.steps=20", "sched.cooldown=0", "train.pause_at_step=9")
    assert not (trunk / "summary.json").exists()
    paused = sorted(p.name for p in (trunk / "checkpoints").glob("step-*"))[-1]
    # A cooldown branch off step 9: 3 more steps that decay (cooldown 0.25 of 12).
    branch = _run(
        real_data,
        tmp_path,
        "branch",
        f"resume={trunk / 'checkpoints' / paused}",
        "train.steps=12",
        "sched.cooldown=0.25",
        "train.pause_at_step=0",
    )
    once = _run(real_data, tmp_path, "once", "train.steps=12", "sched.cooldown=0.25")
    assert _same(_weights(branch), _weights(once))
    assert _rows(branch) == _rows(once)
    # The trunk promoted twice: to step 16 (an epoch's end), then to its end.
    _run(real_data, tmp_path, "trunk", "resume=auto", "train.steps=20", "sched.cooldown=0", "train.pause_at_step=16")
    assert not (trunk / "summary.json").exists() and (trunk / "checkpoints" / "step-00000016").is_dir()
    _run(real_data, tmp_path, "trunk", "resume=auto", "train.steps=20", "sched.cooldown=0")
    whole = _run(real_data, tmp_path, "whole", "train.steps=20", "sched.cooldown=0")
    assert (trunk / "summary.json").exists()
    assert _same(_weights(trunk), _weights(whole))
    assert _rows(trunk) == _rows(whole)
