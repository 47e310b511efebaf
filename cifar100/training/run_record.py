"""What a run writes and prints beside its checkpoints, on the main process: config.yaml and the W&B run
once its folder is open, a row per epoch (metrics.jsonl, the plots, W&B, one printed line) and, at the
finish, summary.json and its closing line. Every process keeps the rows: the summary is made from them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from cifar100.config import Config, to_yaml
from cifar100.runfolder.checkpoint import CheckpointWriter
from cifar100.runfolder.tracking import (
    append_metrics,
    finish_tracking,
    log_wandb,
    plot_run,
    start_wandb,
    write_run_file,
)
from cifar100.training.eta import LengthWarning, RunClock


class RunRecord:
    """The run folder's record: `rows` (every epoch's metrics so far, a resume's earlier ones first)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, rows: list[dict[str, Any]]):
        self.accelerator, self.run_dir, self.rows = accelerator, run_dir, rows

    def open(self, cfg: Config, config_dict: dict[str, Any], wandb_id: str | None) -> str | None:
        """On the main process, once the folder is this run's: config.yaml (rewritten only where it
        differs) and the W&B run `wandb_id` continues (a new one when None); returns the W&B run's id."""
        config, text = self.run_dir / "config.yaml", to_yaml(cfg)
        if not config.is_file() or config.read_text() != text:
            write_run_file(config, text)
        wandb = cfg.log.wandb
        return start_wandb(
            self.accelerator,
            wandb.project,
            wandb.entity,
            wandb.mode,
            Path(wandb.dir) if wandb.dir else self.run_dir,
            self.run_dir.name,
            config_dict,
            run_id=wandb_id,
        )

    def log(self, row: dict[str, Any], epochs: int, left: str | None) -> None:
        """Keep an epoch's row; on the main process, write it to metrics.jsonl, the plots and W&B, and
        print its line (`left`: the run's time left, in words, shown before its last of `epochs`)."""
        self.rows.append(row)
        acc = self.accelerator
        if not acc.is_main_process:
            return
        append_metrics(self.run_dir / "metrics.jsonl", row)
        log_wandb(acc, row, plot_run(self.rows, self.run_dir, self.run_dir.name))
        acc.print(epoch_line(row, epochs, left), flush=True)

    def finish(self, summary: dict[str, Any], selected: str) -> None:
        """summary.json and the closing line (main process), then the end of tracking; `selected`: the
        split that picked the best epoch."""
        acc = self.accelerator
        if acc.is_main_process:
            write_run_file(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            best = summary[f"best_{selected}_top1"]
            acc.print(
                f"done in {summary['wall_seconds']:.0f} s: final test top1 {summary['final_test_top1']:.2%}, "
                f"best {selected} top1 {best:.2%} | {self.run_dir}",
                flush=True,
            )
        finish_tracking(acc, self.run_dir, summary)


@dataclass
class OpenRun:
    """What a run's restore opens for its loop and its finish: the folder's record and checkpoint writer,
    the run's clock and length warning from where it starts, and the wall seconds it ran before (a resume's)."""

    record: RunRecord
    writer: CheckpointWriter
    clock: RunClock
    length_warning: LengthWarning
    wall_before: float


def epoch_line(row: dict[str, Any], epochs: int, left: str | None) -> str:
    """An epoch's printed line: its rate, training and held-out scores, its time, and the run's time left."""
    val = f"val top1 {row['val_top1']:.2%} | " if "val_top1" in row else ""
    ema = f" | EMA test top1 {row['ema_test_top1']:.2%}" if "ema_test_top1" in row else ""
    left = f" | run left ~{left}" if left and row["epoch"] < epochs else ""
    return (
        f"epoch {row['epoch']}/{epochs} | lr {row['lr']:.3g} | train loss "
        f"{row['train_loss']:.4f} top1 {row['train_top1']:.2%} | {val}test loss {row['test_loss']:.4f} "
        f"top1 {row['test_top1']:.2%} top5 {row['test_top5']:.2%}{ema} | {row['epoch_seconds']:.1f} s, "
        f"{row['images_per_second']:.0f} img/s{left}"
    )
