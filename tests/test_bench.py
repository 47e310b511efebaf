"""`cifar100 bench`: real timings of real work, printed and saved."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_bench_recipe_measures_step_data_and_projects(cli, tmp_path, real_data):
    out = cli("bench", "recipe", "recipe=smoke", f"data.root={real_data}", "steps=3", "warmup=1", "batches=3",
              "compile=false", "augment.autoaugment=none", f"json={tmp_path / 'b.json'}")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "b.json").read_text())
    step = result["step"]
    assert [(r["precision"], r["channels_last"], r["loop"]) for r in step] == [
        ("no", True, "engine"), ("no", False, "engine"), ("no", True, "plain")]
    assert all(r["images_per_second"] > 0 and 0 < r["mfu"] and r["host_waits_per_step"] is None for r in step)
    data = {r["pipeline"]: r["images_per_second"] for r in result["data"]}
    assert data["reference"] > 0 and data["device"] > 0
    projection = result["projection"]
    assert projection["epoch_seconds"] == pytest.approx(400 / min(projection["step_images_per_second"],
                                                                  projection["data_images_per_second"]))
    assert projection["run_seconds"] == pytest.approx(projection["epoch_seconds"] * 2)
    assert "images_per_second" in out.stdout and "bound_by" in out.stdout


def test_device_path_refusal_is_reported_not_fatal(cli, real_data):
    out = cli("bench", "data", "recipe=smoke", f"data.root={real_data}", "batches=2", "augment.color_jitter=0.4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no batched ColorJitter" in out.stdout


def test_bench_usage_errors(cli):
    assert cli("bench").returncode == 2
    bad = cli("bench", "step", "steps=many")
    assert bad.returncode == 2 and "steps=many: expected a whole number" in bad.stderr


def test_bench_checkpoint_times_both_writes_and_leaves_nothing(cli, tmp_path):
    out = cli("bench", "checkpoint", "recipe=smoke", f"log.dir={tmp_path}", f"json={tmp_path / 'c.json'}")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "c.json").read_text())["checkpoint"]
    assert [r["write"] for r in rows] == ["foreground", "background"]
    assert all(r["megabytes"] > 0 and 0 < r["training_waits_s"] <= r["on_disk_after_s"] for r in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
