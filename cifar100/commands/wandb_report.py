"""`cifar100 report ... wandb=true`: the same comparison as a W&B Report, or the commands that publish it later.

The Report (built with the `wandb-workspaces` package) opens with the local report's table, then
panels over the runs' W&B histories: test and train accuracy and loss per epoch, grouped by
recipe (W&B draws the mean and a std band over seeds), the final and best accuracies as bars,
and a run comparer of the configs. Saving it needs credentials and network; without either the
local report stands and the commands to run once online are printed.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar100.commands.report_page import TITLE
from cifar100.commands.report_runs import Column

if TYPE_CHECKING:
    from wandb_workspaces.reports.v2.interface import PanelTypes


def wandb_dirs(run_dir: Path) -> list[Path]:
    """The W&B run folders a run left under `<run>/wandb/` (online `run-*` or `offline-run-*`)."""
    return sorted(p for p in (run_dir / "wandb").glob("*run-*") if p.is_dir() and p.name != "latest-run")


def unsynced(run_dir: Path) -> list[Path]:
    """Offline W&B runs of a run folder that `wandb sync` has not uploaded (it leaves a `.synced` marker)."""
    return [d for d in wandb_dirs(run_dir) if d.name.startswith("offline-") and not any(d.glob("*.wandb.synced"))]


def run_ids(run_dir: Path) -> list[str]:
    """W&B run ids of a run folder: the last dash-separated part of each W&B run folder's name."""
    return sorted({d.name.rsplit("-", 1)[-1] for d in wandb_dirs(run_dir)})


def build_report(columns: list[Column], table_markdown: str, entity: str):
    """The W&B Report object (nothing is sent until its `save()`)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    by_project: dict[str, list[str]] = {}
    for column in columns:
        for run in column.runs:
            by_project.setdefault(run.config.log.wandb.project, []).extend(run_ids(run.path))
    runsets = [
        wr.Runset(
            entity=entity,
            project=project,
            name=project,
            filters=expr.And(expr.Metric("ID").isin(ids)),
            groupby=["group"],
        )  # start_wandb makes the sweep, else the recipe, each run's group
        for project, ids in by_project.items()
        if ids
    ]
    # W&B's step is the epoch
    band: dict[str, Any] = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev", "title_x": "epoch"}
    panels: list[PanelTypes] = [
        wr.LinePlot(title="top-1 accuracy per epoch (test, train)", y=["test_top1", "train_top1"], **band),
        wr.LinePlot(title="loss per epoch (test, train)", y=["test_loss", "train_loss"], log_y=True, **band),
        wr.BarPlot(
            title="final and best test top-1",
            metrics=[wr.SummaryMetric("final_test_top1"), wr.SummaryMetric("best_test_top1")],
        ),
        wr.RunComparer(diff_only="split"),
    ]
    return wr.Report(
        project=next(iter(by_project)),
        entity=entity,
        title=TITLE,
        description="Made by `cifar100 report`: the local report's table, then the runs' curves grouped by recipe.",
        blocks=[
            wr.H2("Comparison"),
            wr.MarkdownBlock(text=table_markdown),
            wr.H2("Curves and configs"),
            wr.PanelGrid(runsets=runsets, panels=panels),
        ],
    )


def publish(columns: list[Column], table_markdown: str, rerun: str) -> str:
    """Save the Report and return its address, or return what to run once online (never raises)."""
    import wandb

    runs = [r for c in columns for r in c.runs]
    if not any(run_ids(r.path) for r in runs):
        return "W&B report not made: none of these runs has a W&B run (they trained with log.wandb.mode=disabled)"
    pending = [d for r in runs for d in unsynced(r.path)]
    try:
        api = wandb.Api()
    except wandb.errors.UsageError as err:
        return _later(f"no W&B credentials ({str(err).rstrip('.')})", pending, rerun, login=True)
    if pending:
        return _later(f"{len(pending)} run(s) exist only offline", pending, rerun, login=False)
    try:
        entity = columns[0].runs[0].config.log.wandb.entity or api.default_entity
        if entity is None:  # an account W&B names no default entity for
            return _later("W&B names no default entity for this login; set log.wandb.entity", [], rerun, login=False)
        report = build_report(columns, table_markdown, entity)
        report.save()
        return f"W&B report: {report.url}"
    except Exception as err:
        return _later(f"W&B did not answer ({type(err).__name__}: {err})", [], rerun, login=False)


def _later(reason: str, pending: list[Path], rerun: str, login: bool) -> str:
    steps = (
        (["wandb login"] if login else [])
        + (["wandb sync " + " ".join(shlex.quote(str(d)) for d in pending)] if pending else [])
        + [rerun]
    )
    return f"W&B report not published: {reason}. The local report is written. Once online, run:\n" + "\n".join(
        f"  {s}" for s in steps
    )
