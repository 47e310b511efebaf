"""`cifar100 report`: the seed report's comparison table, per-run plots and overlaid curves, for any runs.

The runs are found and read by `report_runs`, the page is written by `report_page`. The output
folder gets `report.md` with its images beside it, and `report.html`, the same page with the
images embedded, one file that opens from disk. Every file is written through `safe_files`: never
through a link, and never inside a run folder.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

from cifar100.commands.report_page import render_html, render_markdown, table
from cifar100.commands.report_runs import Column, find_runs, group_runs
from cifar100.errors import UserError
from cifar100.runfolder.safe_files import make_folders, refuse_run_folder, write_atomic
from cifar100.runfolder.tracking import plot_history

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator, PercentFormatter


def plot_overlay(columns: list[Column], out: Path) -> list[Path]:
    """overlay-accuracy.png and overlay-loss.png: every run's curves, one colour per column."""
    paths = []
    for metric, ylabel in (("top1", "top-1 accuracy"), ("loss", "loss")):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for i, column in enumerate(columns):
            for j, run in enumerate(column.runs):
                epochs = [r["epoch"] for r in run.rows]
                ax.plot(
                    epochs,
                    [r[f"test_{metric}"] for r in run.rows],
                    color=f"C{i % 10}",
                    marker=".",
                    label=column.label if j == 0 else None,
                )
                ax.plot(epochs, [r[f"train_{metric}"] for r in run.rows], color=f"C{i % 10}", ls="--", alpha=0.5)
        if metric == "loss":
            ax.set_yscale("log")  # an untrained first epoch's test loss would squash the rest
        else:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"all runs, {ylabel}: test solid, train dashed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"overlay-{'accuracy' if metric == 'top1' else 'loss'}.png"
        image = io.BytesIO()
        fig.savefig(image, format="png")
        plt.close(fig)
        write_atomic(path, image.getvalue())
        paths.append(path)
    return paths


def make_report(patterns: list[str], out: Path) -> tuple[Path, list[Column], list[str]]:
    """Write report.md, report.html and their images into `out`; returns report.md, the columns and skip notes."""
    runs, skipped = find_runs(patterns)
    if not runs:
        raise UserError(f"no finished run folder (one with summary.json) in: {'; '.join(skipped)}")
    columns = group_runs(runs)
    refuse_run_folder(out / "report.md", f"out={out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out={out}: cannot write there ({err.strerror or err})") from None
    overlay, per_run = plot_overlay(columns, out), {}
    for run in runs:
        # One folder per run below out/runs/: a label's "/" and a leading "." would lead elsewhere.
        name = run.label.replace("/", "_")
        folder = make_folders(out, "runs", "_" + name[1:] if name.startswith(".") else name)
        refuse_run_folder(folder / "loss.png", f"out={out}")
        per_run[run.label] = plot_history(run.rows, folder, run.label)
    rows = table(columns)
    write_atomic(out / "report.md", render_markdown(rows, columns, overlay, per_run, out).encode())
    write_atomic(out / "report.html", render_html(rows, columns, overlay, per_run).encode())
    return out / "report.md", columns, skipped
