"""bench/gpu.sh on the CPU with a tiny recipe: the path the GPU run takes, only smaller."""

from __future__ import annotations

import datetime
import gzip
import json

import pytest
from conftest import ROOT, run_cmd

pytestmark = pytest.mark.slow
TINY = {
    "GPU_BENCH_RECIPE": "smoke",
    "GPU_BENCH_EPOCHS": "2",
    "GPU_BENCH_STEPS": "3",
    "GPU_BENCH_WARMUP": "1",
    "GPU_BENCH_WORKERS": "0",
}


def gpu_sh(data, out, **env):
    return run_cmd(["bash", str(ROOT / "bench" / "gpu.sh"), str(data), str(out)], env={**TINY, **env}, timeout=900)


def test_every_section_runs_and_one_failing_section_loses_nothing_else(real_data, tmp_path):
    # A mode that does not exist: the last section fails at once; the others must still be reported.
    done = gpu_sh(
        real_data,
        tmp_path,
        GPU_BENCH_MODES="max-autotune,bogus",
        GPU_BENCH_BUDGET="30s",
        GPU_BENCH_SECTIONS="step,e2e,step-autotune,best-budget",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / f"{datetime.date.today().isoformat()}-cpu-fulldata.json").read_text())
    assert result["sections"] == {
        "best-budget": "0",
        "step": "0",
        "e2e-reference": "0",
        "e2e-device": "0",
        "step-autotune": "2",
    }
    budget_run = result["e2e"]["best-budget"]
    plan = budget_run["summary"]["plan"]
    assert plan["budget_seconds"] == 30 and plan["ended_seconds"] <= 30 * 1.02 + 2 and plan["last_step_lr"] == 0
    assert budget_run["totals"]["final_test_top1"] == budget_run["summary"]["final_test_top1"]
    assert any(r["section"] == "best-budget" and r["note"].startswith("budget 30 s") for r in result["table"])
    table = result["table"]
    table = [r for r in table if r["section"] != "best-budget"]
    step = [r for r in table if r["section"] == "step"]
    assert [r["variant"] for r in step] == [
        "no, channels_last, eager",
        "no, channels_last, compile default",
        "no, NCHW, eager",
    ]  # smoke trains NCHW: its own row is measured too
    assert step[0]["vs_step"] == 1.0 and "graph breaks 0" in step[1]["note"]
    eager_nchw = step[2]["images_per_second"]
    for pipeline in ("reference", "device"):
        rows = [r for r in table if r["section"] == f"e2e-{pipeline}"]
        epochs = [r for r in rows if r["variant"] == "epoch"]
        assert [r["epoch"] for r in epochs] == [1, 2]
        assert all(r["eval_s"] > 0 and r["checkpoint_s"] > 0 and 0 <= r["test_top1"] <= 1 for r in epochs)
        assert epochs[1]["vs_step"] == pytest.approx(epochs[1]["images_per_second"] / eager_nchw)
        total = rows[-1]
        metrics = result["e2e"][f"e2e-{pipeline}"]["metrics"][1]
        seconds = metrics["epoch_seconds"] + metrics["eval_seconds"] + metrics["checkpoint_seconds"]
        assert total["images_per_second"] == pytest.approx(400 / seconds)
        assert total["vs_step"] == pytest.approx(total["images_per_second"] / eager_nchw)
        assert result["e2e"][f"e2e-{pipeline}"]["totals"]["projected_run_seconds"] == pytest.approx(200 * seconds)
    assert set(result["e2e"]["top1_device_minus_reference"]) == {"1", "2"}
    assert table[-1] == {
        "section": "step-autotune",
        "variant": "",
        "epoch": "",
        "images_per_second": None,
        "vs_step": None,
        "eval_s": None,
        "checkpoint_s": None,
        "test_top1": None,
        "note": "failed: exit status 2; see the log",
    }
    kernels = result["step"]["step"]["step"][1]["top_kernels"]
    assert len(kernels) == 15 and sum(k["share"] for k in kernels) <= 1
    with gzip.open(tmp_path / "trace.json.gz") as f:
        assert json.load(f)["traceEvents"]
    log = (tmp_path / "gpu.log").read_text()
    assert "top 15 CPU operators by self time" in log and "saved " in log.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{datetime.date.today().isoformat()}-cpu-fulldata.json", "gpu.log", "trace.json.gz"]
    )


def test_sections_past_the_budget_are_skipped_and_still_reported(real_data, tmp_path):
    done = gpu_sh(real_data, tmp_path, GPU_BENCH_SECONDS="20")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-fulldata.json")).read_text())
    assert result["sections"] == dict.fromkeys(["step", "e2e-reference", "e2e-device", "step-autotune"], "skipped")
    assert [r["note"] for r in result["table"]] == ["skipped: no time left"] * 4


def test_fast_section_reports_the_training_seconds_to_the_final_epoch_and_its_top1(real_data, tmp_path):
    """recipe=fast at tiny sizes (a tiny net, 400 images, fp32, eager): the section's row says how long
    training took to the final epoch, and the top-1 is the run's own."""
    done = gpu_sh(
        real_data,
        tmp_path,
        GPU_BENCH_SECTIONS="fast",
        GPU_BENCH_FAST_PRECISION="no",
        GPU_BENCH_FAST_COMPILE="false",
        GPU_BENCH_FAST_ARGS="model.name=cifarnet_tiny model.whiten=false data.train_limit=400 data.test_limit=200 "
        "data.batch_size=50 data.eval_batch_size=200 train.epochs=2",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-fulldata.json")).read_text())
    assert result["sections"] == {"fast": "0"}
    run = result["e2e"]["fast"]
    assert run["summary"]["recipe"] == "fast" and run["totals"]["epochs"] == 2
    train_seconds = sum(m["epoch_seconds"] for m in run["metrics"])
    assert run["totals"]["train_seconds_to_final_epoch"] == pytest.approx(train_seconds)
    last = result["table"][-1]
    assert last["note"].startswith(f"2 epochs: {train_seconds:.1f} s of training to the final epoch")
    assert last["test_top1"] == run["summary"]["final_test_top1"]
