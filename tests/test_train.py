"""End to end: `python train.py recipe=smoke` and its DDP, W&B and device-path variants, as real processes."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml
from conftest import run_cmd

from cifar100.config import load_config
from cifar100.data.cifar import load, select_splits
from cifar100.runfolder.checkpoint import apply_weights, is_complete, load_weights, read_meta
from cifar100.training.evaluation import EvalSettings, evaluate
from cifar100.training.models import build_model

# Slow, and the smoke test scores a run with an Accelerator of its own.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("accelerate_state")]

METRIC_KEYS = {
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "test_loss",
    "test_top1",
    "test_top5",
    "epoch_seconds",
    "images_per_second",
    "eval_seconds",
    "checkpoint_seconds",
}
SUMMARY_KEYS = {
    "recipe",
    "final_test_top1",
    "final_test_top5",
    "best_test_top1",
    "best_epoch",
    "epochs",
    "wall_seconds",
    "images_per_second",
    "world_size",
    "precision",
    "device",
}


def train(tmp_path, real_data, *args, launcher=(sys.executable, "train.py"), env=None):
    result = run_cmd([*launcher, "recipe=smoke", f"data.root={real_data}", f"log.dir={tmp_path}", *args], env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_smoke_run_leaves_a_complete_run_folder(tmp_path, real_data):
    out = train(tmp_path, real_data)
    run = tmp_path / "smoke"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config == yaml.safe_load(out.stdout[: out.stdout.index("run folder")])  # printed at start, saved as ran
    assert config["model"]["name"] == "cifarnet_tiny" and config["data"]["root"] == str(real_data)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(METRIC_KEYS <= set(r) for r in rows)
    assert rows[0]["lr"] == pytest.approx(1e-4)  # warmup starts at sched.warmup_lr
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["final_test_top1"] == rows[-1]["test_top1"]
    assert summary["best_test_top1"] == max(r["test_top1"] for r in rows)
    assert (summary["world_size"], summary["precision"], summary["device"]) == (1, "no", "cpu")
    assert summary["images_per_rank"] == [800]  # 400 images x 2 epochs
    for plot in ("loss.png", "accuracy.png"):
        assert (run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for tag in ("last", "best"):
        assert is_complete(run / "checkpoints" / tag)

    # The last checkpoint reproduces the last epoch's test accuracy exactly.
    cfg = load_config("smoke", [f"data.root={real_data}"])
    model = build_model(cfg.model, 100)
    apply_weights(model, load_weights(run / "checkpoints" / "last"), run)
    assert read_meta(run / "checkpoints" / "last")["epoch"] == 2
    from accelerate import Accelerator

    data = load(real_data)
    test_idx = select_splits(data, cfg.data, cfg.seed).test
    result = evaluate(
        model,
        data.test.images[test_idx],
        data.test.labels[test_idx],
        Accelerator(cpu=True),
        EvalSettings(cfg.augment.mean, cfg.augment.std, batch_size=64),
    )
    assert result.top1 == rows[-1]["test_top1"] and result.loss == pytest.approx(rows[-1]["test_loss"], rel=1e-6)

    # Same seed, same command: the same numbers, and a new folder beside the old one.
    train(tmp_path, real_data)
    again = [json.loads(line) for line in (tmp_path / "smoke-2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_loss"] for r in again] == [r["test_loss"] for r in rows]
    assert (run / "summary.json").exists()


def test_two_process_ddp_on_cpu(tmp_path, real_data):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py")
    out = train(
        tmp_path, real_data, "name=ddp", launcher=launcher, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    )
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["images_per_rank"] == [400, 400]  # both ranks trained half of each global batch
    assert "2 process(es)" in out.stdout and "25 images per process per step" in out.stdout
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2  # only the main process writes
    assert json.loads(rows[-1])["test_top5"] > 0


def test_device_pipeline_run(tmp_path, real_data):
    train(tmp_path, real_data, "name=dev", "data.pipeline=device", "augment.autoaugment=none")
    summary = json.loads((tmp_path / "dev" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["images_per_rank"] == [800]


def test_wandb_offline_run_is_written_into_the_run_folder(tmp_path, real_data):
    train(tmp_path, real_data, "name=wb", "log.wandb.mode=offline", env={"WANDB_MODE": "offline"})
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run's transaction log (protobuf, strings stored verbatim) holds the config and every metric.
    log = next(runs[0].glob("*.wandb")).read_bytes()
    for text in (b"cifarnet_tiny", b"smoke", b"test_top1", b"train_loss", b"images_per_second"):
        assert text in log
    images = {p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "images").glob("*.png")}
    assert images == {"loss", "accuracy"}


def test_missing_dataset_is_one_clear_line(tmp_path):
    out = run_cmd(
        [
            sys.executable,
            "train.py",
            "recipe=smoke",
            f"data.root={tmp_path}/nowhere",
            "data.download=false",
            f"log.dir={tmp_path}",
        ]
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and "nowhere" in out.stderr
    assert not list(tmp_path.glob("smoke*"))  # nothing half-made


@pytest.mark.parametrize("command", [("train.py",), ("-m", "cifar100", "bench", "checkpoint")])
def test_a_log_dir_that_cannot_be_made_is_one_clear_line(tmp_path, real_data, command):
    (tmp_path / "file").write_text("not a folder")
    out = run_cmd([sys.executable, *command, "recipe=smoke", f"data.root={real_data}", f"log.dir={tmp_path}/file/runs"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        out.stderr.splitlines()[-1] == f"error: {tmp_path}/file/runs: Not a directory" and "Traceback" not in out.stderr
    )
    # Under a launcher such an error is often one rank's own, so each rank says it, with its number.
    ranked = run_cmd(
        [sys.executable, *command, "recipe=smoke", f"data.root={real_data}", f"log.dir={tmp_path}/file/runs"],
        env={"RANK": "1"},
    )
    assert (
        ranked.returncode == 2
        and ranked.stderr.splitlines()[-1] == f"error: [rank 1] {tmp_path}/file/runs: Not a directory"
    )


def test_wandb_online_without_a_login_logs_offline_and_never_prompts(tmp_path, real_data):
    # online mode without credentials (a fresh HOME, no API key): no prompt, no network, an offline run instead.
    assert "WANDB_API_KEY" not in os.environ
    env = {"HOME": str(tmp_path)}
    out = train(tmp_path, real_data, "name=wbfail", "log.wandb.mode=online", env=env)
    assert (
        f"warning: log.wandb.mode=online, but no W&B login here (`wandb login` or WANDB_API_KEY): logging "
        f"offline into {tmp_path / 'wbfail' / 'wandb'} instead"
    ) in out.stderr
    assert "Traceback" not in out.stderr and len(list((tmp_path / "wbfail" / "wandb").glob("offline-run-*"))) == 1
    assert json.loads((tmp_path / "wbfail" / "summary.json").read_text())["epochs"] == 2


def test_wandb_online_without_a_login_does_not_wait_at_a_prompt_in_a_terminal(tmp_path, real_data):
    """In a terminal, wandb.init would ask how to log in and wait for an answer."""
    from test_signals import Terminal

    term = Terminal(
        tmp_path,
        [
            "env",
            "-u",
            "WANDB_API_KEY",
            f"HOME={tmp_path}",
            sys.executable,
            "train.py",
            "recipe=smoke",
            f"data.root={real_data}",
            f"log.dir={tmp_path}",
            "name=tty",
            "train.epochs=1",
            "log.wandb.mode=online",
        ],
    )
    try:
        status = term.exit_status(timeout=300)  # waiting at a prompt ends here
        screen = term.screen()
        assert status == 0, screen[-3000:]
    finally:
        term.close()
    assert "no W&B login here" in screen and "Enter your choice" not in screen, screen[-3000:]
    assert json.loads((tmp_path / "tty" / "summary.json").read_text())["epochs"] == 1


def test_build_time_checks_make_no_folder(tmp_path, real_data):
    """Values each valid alone, refused together once the parts are built: before any folder exists."""
    for values in (["sched.warmup_epochs=5"], ["augment.cutmix.prob=0.8", "augment.mixup.prob=0.5"]):
        out = run_cmd(
            [
                sys.executable,
                "train.py",
                "recipe=smoke",
                f"data.root={real_data}",
                f"log.dir={tmp_path / 'runs'}",
                *values,
            ]
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert not (tmp_path / "runs").exists()


def test_worker_count_does_not_change_the_numbers(tmp_path, real_data):
    """Persistent workers follow set_epoch; every augmentation draw depends on (seed, epoch, index) only."""
    losses = []
    for workers in (0, 2):
        train(tmp_path, real_data, f"name=w{workers}", f"data.workers={workers}", "train.epochs=3")
        rows = [json.loads(line) for line in (tmp_path / f"w{workers}" / "metrics.jsonl").read_text().splitlines()]
        losses.append([(r["train_loss"], r["test_loss"]) for r in rows])
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_limits_at_or_above_a_split_keep_it_whole(real_data):

    data = load(real_data)
    whole = select_splits(data, load_config("smoke", ["data.train_limit=50000", "data.test_limit=10000"]).data, 0)
    assert (len(whole.train), len(whole.test)) == (50000, 10000)
    some = select_splits(data, load_config("smoke", ["data.test_limit=1000", "data.val_size=5000"]).data, 0)
    assert (len(some.train), len(some.val), len(some.test)) == (400, 5000, 1000)


def test_weight_averaging_is_scored_plotted_kept_and_chosen(tmp_path, real_data):
    """train.ema with a validation split: EMA rows and summary figures, the averaged weights in the
    last checkpoint and, selected by their val score, in best; `cifar100 eval` scores both; the report
    gets a row for them."""
    from cifar100.commands.report import make_report, table

    train(
        tmp_path,
        real_data,
        "name=ema",
        "data.val_size=200",
        "train.ema.enabled=true",
        "train.ema.decay=0.9",
        "train.ema.select=ema",
    )
    run = tmp_path / "ema"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for split in ("val", "test"):
        assert all({f"ema_{split}_loss", f"ema_{split}_top1", f"ema_{split}_top5"} <= set(r) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    best = max(rows, key=lambda r: r["ema_val_top1"])
    assert summary["final_ema_test_top1"] == rows[-1]["ema_test_top1"] and summary["best_weights"] == "ema"
    assert (summary["best_ema_val_epoch"], summary["ema_test_top1_at_best_ema_val"]) == (
        best["epoch"],
        best["ema_test_top1"],
    )
    assert read_meta(run / "checkpoints" / "best")["weights"] == "ema"
    for args, tag, expected in (
        (("checkpoint=best",), "best", best),
        (("checkpoint=last", "weights=ema"), "last-ema", rows[-1]),
    ):
        out = run_cmd([sys.executable, "-m", "cifar100", "eval", f"run={run}", *args, f"data.root={real_data}"])
        assert out.returncode == 0, out.stderr[-2000:]
        scored = json.loads((run / f"eval-{tag}.json").read_text())
        assert scored["weights"] == "ema" and scored["splits"]["test"]["top1"] == expected["ema_test_top1"]
        assert scored["splits"]["val"]["top1"] == expected["ema_val_top1"]
    _, columns, _ = make_report([str(run)], tmp_path / "report")
    cells = dict(table(columns))
    assert cells["final top-1, EMA weights (test)"] == [f"{100 * rows[-1]['ema_test_top1']:.2f} % (decay 0.9)"]
    assert cells["best top-1 (test)"][0].endswith(f"at epoch {best['epoch']}, EMA weights, chosen on val")
