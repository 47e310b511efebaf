"""What a run leaves behind: metrics.jsonl, loss/accuracy plots, summary.json, and W&B.

Only the main process calls these, except `finish_tracking`, which every process calls. W&B goes
through Accelerate's tracker; any W&B failure is a warning, never the end of a training run.
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
# Loaded now, with the process's other libraries, not at the first plot: under `ulimit -v` a first plot
# after the training step had filled the limit could not map the backend's library (ImportError).
import matplotlib.backends.backend_agg
import matplotlib.pyplot as plt
from accelerate import Accelerator

from cifar100.errors import UserError, clip
from cifar100.runfolder.checkpoint import is_complete, read_meta
from cifar100.runfolder.records import metrics_row_problem
from cifar100.runfolder.safe_files import METRICS_BYTES, open_no_follow, read_text, write_atomic

# Every text on a plot is literal: run names, folder names and sweep values become titles and
# legends, and mathtext would read `a$$b` as a formula (and fail). The report and eval plot through
# this module's import too.
matplotlib.rcParams["text.parse_math"] = False


def stopped(path: Path, err: OSError) -> UserError:
    """The one line a run ends with when a file it cannot go on without was not written."""
    return UserError(
        f"{path}: not written ({err.strerror or err}); the run stops here: free space, then continue "
        "with the same command plus resume=auto"
    )


def write_run_file(path: Path, text: str) -> None:
    """Replace a file of the run folder (config.yaml, summary.json) atomically; a failed write stops
    the run with one line and leaves the old file."""
    try:
        write_atomic(path, text.encode())
    except OSError as err:
        raise stopped(path, err) from None


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch's row to metrics.jsonl and flush it to disk. A failed write (a full disk)
    cuts the file back to its previous rows and stops the run: an epoch it cannot record would be lost."""
    fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    start = os.fstat(fd).st_size
    try:
        data = (json.dumps(row) + "\n").encode()
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as err:
        os.ftruncate(fd, start)
        raise stopped(path, err) from None
    finally:
        os.close(fd)


def rewrite_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `rows` atomically (a resume drops epochs its checkpoint did not reach)."""
    write_run_file(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (an empty list when there is none), each checked as data.

    A bad last line is what a crash while appending leaves: it is dropped with a warning. A bad
    line before it is an error naming the line.
    """
    try:
        lines = read_text(path, METRICS_BYTES, "metrics file").splitlines()
    except FileNotFoundError:
        return []
    rows: list[dict[str, Any]] = []
    problem: str | None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:  # ValueError: JSON's, and a number of 5,000 digits
            row, problem = None, f"not JSON: {clip(str(err))}"
        else:
            problem = metrics_row_problem(row, rows[-1]["epoch"] if rows else 0)
        if problem and number == len(lines):
            warnings.warn(f"{path}: dropped the last line, cut short or malformed ({problem})", stacklevel=2)
        elif problem:
            raise UserError(f"{path}: line {number} unreadable ({problem})")
        else:
            rows.append(row)
    return rows


def plot_history(rows: list[dict[str, Any]], run_dir: Path, title: str) -> list[Path]:
    """loss.png and accuracy.png: train and test (and val) curves per epoch, as in the report; the
    EMA weights' curves dashed, in their split's colour, when the run averages weights."""
    epochs = [r["epoch"] for r in rows]
    paths = []
    for metric, ylabel in (("loss", "loss"), ("top1", "top-1 accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for split in ("train", "val", "test"):
            key = f"{split}_{metric}"
            if not rows or key not in rows[0]:
                continue
            # A row without the figure (a hand-edited file) is a gap in the curve, not an error.
            (line,) = ax.plot(epochs, _column(rows, key), label=split, marker="." if len(rows) < 30 else None)
            if f"ema_{key}" in rows[0]:
                ax.plot(
                    epochs,
                    _column(rows, f"ema_{key}"),
                    label=f"{split}, EMA weights",
                    linestyle="--",
                    color=line.get_color(),
                )
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title}: {ylabel}")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend()
        fig.tight_layout()
        path = run_dir / ("loss.png" if metric == "loss" else "accuracy.png")
        image = io.BytesIO()
        fig.savefig(image, format="png")
        plt.close(fig)
        write_atomic(path, image.getvalue())
        paths.append(path)
    return paths


def _column(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [row.get(key, math.nan) for row in rows]


def plot_run(rows: list[dict[str, Any]], run_dir: Path, title: str) -> list[Path]:
    """`plot_history` for a training run: plots that cannot be written (a full disk) are a warning,
    never a stop (the next epoch draws them again from metrics.jsonl's rows)."""
    try:
        return plot_history(rows, run_dir, title)
    except OSError as err:
        warnings.warn(f"loss.png and accuracy.png not updated ({err.strerror or err}); training goes on", stacklevel=2)
        return []


def summarize(rows: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """summary.json's content: final and best test accuracy (and val when present), the same for
    the EMA weights (`*_ema_*`) when the run averaged them, plus run facts."""
    summary = {**_final_and_best(rows, ""), "epochs": rows[-1]["epoch"]}
    if "ema_test_top1" in rows[-1]:
        summary.update(_final_and_best(rows, "ema_"))
    summary.update(fields)
    return summary


def _final_and_best(rows: list[dict[str, Any]], weights: str) -> dict[str, Any]:
    """Final and best figures of one set of weights: "" (the model's) or "ema_" (`ema_test_top1`, ...)."""
    last, test, val = rows[-1], f"{weights}test", f"{weights}val"
    best = max(rows, key=lambda r: r[f"{test}_top1"])
    out = {
        f"final_{test}_top1": last[f"{test}_top1"],
        f"final_{test}_top5": last[f"{test}_top5"],
        f"best_{test}_top1": best[f"{test}_top1"],
        f"best_{weights}epoch": best["epoch"],
    }
    if f"{val}_top1" in last:
        best_val = max(rows, key=lambda r: r[f"{val}_top1"])
        out.update(
            {
                f"final_{val}_top1": last[f"{val}_top1"],
                f"best_{val}_top1": best_val[f"{val}_top1"],
                f"best_{val}_epoch": best_val["epoch"],
                f"{test}_top1_at_best_{val}": best_val[f"{test}_top1"],
            }
        )
    return out


def start_wandb(
    accelerator: Accelerator,
    project: str,
    entity: str | None,
    mode: str,
    run_dir: Path,
    name: str,
    config: dict[str, Any],
    run_id: str | None = None,
) -> str | None:
    """Open the W&B run through Accelerate's tracker; returns its id, or None when off or failing."""
    if mode == "disabled":
        return None
    if mode == "online" and not _has_login():
        # Without credentials, wandb.init asks at an interactive prompt and waits there for an answer.
        warnings.warn(
            f"log.wandb.mode=online, but no W&B login here (`wandb login` or WANDB_API_KEY): logging offline "
            f"into {run_dir / 'wandb'} instead, to upload later with wandb sync",
            stacklevel=2,
        )
        mode = "offline"
    init = {
        "name": name,
        "dir": str(run_dir),
        "mode": mode,
        "id": run_id,
        "resume": "allow" if run_id else None,
        "group": config.get("sweep", {}).get("name") or config.get("recipe") or None,
        "tags": [t for t in (config.get("recipe"), config["model"]["name"]) if t],
    }
    try:
        accelerator.init_trackers(
            project,
            config=config,
            init_kwargs={
                "wandb": {k: v for k, v in init.items() if v is not None} | ({"entity": entity} if entity else {})
            },
        )
        return accelerator.get_tracker("wandb", unwrap=True).id
    except Exception as err:
        warnings.warn(f"W&B could not start ({type(err).__name__}: {err}); training continues without it", stacklevel=2)
        accelerator.trackers = []  # a half-started tracker would fail again at every log and at the end
        return None


def _has_login() -> bool:
    """Whether W&B finds credentials (environment, ~/.netrc, settings) without prompting or network."""
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:
        return True


def log_wandb(accelerator: Accelerator, row: dict[str, Any], images: Sequence[Path] = ()) -> None:
    """Log one epoch's metrics (and plot images) to W&B when a run is open."""
    if not accelerator.trackers:
        return
    try:
        accelerator.log(row, step=row["epoch"])
        if images:
            import wandb

            run = accelerator.get_tracker("wandb", unwrap=True)
            run.log({p.stem: wandb.Image(str(p)) for p in images}, step=row["epoch"])
    except Exception as err:
        warnings.warn(f"W&B logging failed ({type(err).__name__}: {err}); training continues", stacklevel=2)


def finish_tracking(accelerator: Accelerator, run_dir: Path, summary: dict[str, Any]) -> None:
    """End the W&B run; every process calls this in place of `accelerator.end_training()`.

    Before closing, the main process adds summary.json to the run's summary and logs the best and
    last checkpoints as versions of one model artifact, aliased "best" and "last". After closing,
    an offline run's `wandb sync` command is printed: it names the folder of every start of the
    run (a resumed run adds one per start, under the same id), which wandb uploads in order.
    """
    sync_dirs: list[Path] = []
    if accelerator.is_main_process and accelerator.trackers:
        try:
            run = accelerator.get_tracker("wandb", unwrap=True)
            run.summary.update(summary)
            log_checkpoints(run, run_dir / "checkpoints")
            sync_dirs = offline_runs(Path(run.settings.sync_dir).parent, run.id) if run.offline else []
        except Exception as err:
            warnings.warn(f"W&B could not record the checkpoints ({type(err).__name__}: {err})", stacklevel=2)
    accelerator.end_training()
    if sync_dirs:
        print(
            f"W&B run saved offline; to upload it: wandb sync {' '.join(shlex.quote(str(d)) for d in sync_dirs)}",
            flush=True,
        )


def offline_runs(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline folders of one run, oldest start first (names begin offline-run-YYYYMMDD_HHMMSS)."""
    return sorted(wandb_dir.glob(f"offline-run-*-{run_id}"))


def log_checkpoints(run: Any, ckpt_dir: Path) -> None:
    """Log `best/` and `last/` as the model artifact `model-<run id>`, aliased by their names.

    The files are referenced where they lie (policy "immutable": the run is over, they will not
    change) instead of copied into W&B's staging area. When best is last, W&B sees the same
    digest twice and keeps one version carrying both aliases.
    """
    import wandb

    for alias in ("last", "best"):
        folder = (ckpt_dir / alias).resolve()  # `last` may be a link to the newest step checkpoint
        if not is_complete(folder):
            continue
        meta = {k: v for k, v in read_meta(folder).items() if k != "config"}  # the run's config is logged already
        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=meta)
        for name in ("model.safetensors", "meta.json"):
            artifact.add_file(str(folder / name), policy="immutable")
        run.log_artifact(artifact, aliases=[alias])
