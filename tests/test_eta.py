"""The whole run's forecast, the warning a far too long run gets, and loader workers capped at the usable cores."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import run_cmd

from cifar100.training.eta import RECENT_WINDOW, TIMED_STEPS, RunClock, duration_text, too_long


def test_forecast_appears_after_the_timed_steps_and_counts_the_evaluations_left():
    clock = RunClock(total_steps=100, epochs=10, done_steps=0, done_epochs=0)
    clock.start_epoch()
    clock.step(1)  # the first step of an epoch is never timed
    for step in range(2, 1 + TIMED_STEPS):
        time.sleep(0.02)
        clock.step(step)
        assert clock.left_text() is None  # fewer than TIMED_STEPS timed
    time.sleep(0.02)
    clock.step(1 + TIMED_STEPS)
    per_step = clock.step_seconds
    assert 0.02 <= per_step < 0.2
    assert clock.seconds_left() == pytest.approx((100 - 1 - TIMED_STEPS) * per_step)
    clock.evaluated(1.5)  # each of the 9 evaluations left is forecast at the last one's cost
    assert clock.seconds_left() == pytest.approx((100 - 1 - TIMED_STEPS) * per_step + 9 * 1.5)
    clock.start_epoch()
    time.sleep(0.05)
    clock.step(5)  # the gap before an epoch's first step (evaluation, loader start) is not a step's time
    assert clock.step_seconds == per_step


def test_the_current_rate_is_the_median_of_the_latest_steps_so_a_stall_does_not_move_it():
    clock = RunClock(total_steps=100, epochs=1, done_steps=0, done_epochs=0)
    clock.start_epoch()
    clock.step(1)
    pauses = [0.01] * 9 + [0.3] + [0.01] * 9  # one stall of 30 steps' time among 19 steps
    for step, pause in enumerate(pauses, start=2):
        time.sleep(pause)
        clock.step(step)
    assert 0.01 <= clock.recent_step_seconds < 0.03  # a mean would read 0.025 s or more
    for step in range(21, 21 + RECENT_WINDOW):  # a machine that slowed down for a whole window is followed
        time.sleep(0.04)
        clock.step(step)
    assert clock.recent_step_seconds >= 0.04 and len(clock.recent) == RECENT_WINDOW


def test_durations_read_in_days_for_runs_of_weeks():
    assert [duration_text(s) for s in (12, 185, 8100, 18 * 86_400 + 4 * 3600 + 1800)] == [
        "12 s",
        "3 m 05 s",
        "2 h 15 m",
        "18 d 04 h",
    ]


def test_the_warning_names_the_cpu_recipe_on_a_cpu_only():
    clock = RunClock(total_steps=19_600, epochs=200, done_steps=2, done_epochs=0)
    clock.timed_steps, clock.timed_seconds = 1, 80.0  # one 80-second step: enough to project
    assert too_long(clock, elapsed=200.0, limit_hours=24, device="cpu").startswith(
        "this run is projected to take 18 d 03 h on cpu (80 s per step measured, 19598 steps and 200 evaluations left)"
    )
    assert "recipe=cpu" in too_long(clock, 200.0, 24, "cpu")
    assert "recipe=cpu" not in too_long(clock, 200.0, 24, "cuda") and "--num_processes" in too_long(
        clock, 200.0, 24, "cuda"
    )
    assert too_long(clock, 200.0, limit_hours=24 * 30, device="cpu") is None


@pytest.mark.slow
def test_first_run_shows_its_forecast_warns_once_and_caps_the_workers(tmp_path, real_data):
    """A real run pinned to one core, asking for 3 workers, with a threshold any run exceeds."""
    out = run_cmd(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "train.py",
            "recipe=smoke",
            f"data.root={real_data}",
            f"log.dir={tmp_path}",
            "log.progress=true",
            "log.warn_hours=1e-6",
            "data.workers=3",
            "train.epochs=3",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("data.workers=3 lowered to 1: this process may use 1 CPU core(s)") == 1
    assert "DataLoader will create" not in out.stderr  # PyTorch's own warning never comes
    assert out.stderr.count("warning: this run is projected to take ") == 1
    assert "on cpu" in out.stderr and "recipe=cpu" in out.stderr and "log.warn_hours=1e-06" in out.stderr
    assert "run_left=" in out.stderr  # on the progress bar
    epoch_lines = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all("| run left ~" in line for line in epoch_lines[:2])
    assert "run left" not in epoch_lines[2]  # nothing is left after the last
