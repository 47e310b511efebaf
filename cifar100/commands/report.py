"""`cifar100 report`: the seed report's comparison table, per-run plots and overlaid curves, for any runs.

Runs whose configs differ only in seed (and in where they ran) are repeats of one experiment:
they share a column that shows mean ± sample standard deviation. The output folder gets
`report.md` with its images beside it, and `report.html`, the same page with the images
embedded, one file that opens from disk.
"""

from __future__ import annotations

import base64
import glob
import html
import json
import re
import statistics
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

from cifar100.config import Config, flatten, from_dict, is_launch_key, read_yaml, to_dict
from cifar100.errors import UserError, clip
from cifar100.runfolder.records import summary_problem
from cifar100.runfolder.tracking import plot_history, read_metrics
from cifar100.training.eta import duration_text
from cifar100.training.optim import OPTIMIZERS, SCHEDULES

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator, PercentFormatter

TITLE = "CIFAR-100 runs compared"

# Keys that say where or how a run was launched, not what it trained: runs that differ only in
# these (and the seed) repeat one experiment and share a column.
# Markdown; render_html turns its **bold**, *italic* and `code` into tags.
EXPLANATION = (
    "Each column is one training run, or several runs of one configuration that differ only in their "
    "random seed: those show the mean ± sample standard deviation over the seeds. "
    "**final top-1** is the test accuracy after the last epoch. **best top-1** is the test accuracy "
    "at the best epoch, and says which split chose that epoch: chosen on *test* flatters the model "
    "(the test set itself picked the epoch, as in the original report); chosen on *val* (images held "
    "out of training, `data.val_size`) is a fair estimate. **time** is the wall-clock time "
    "of the whole run on the hardware named below it."
)


@dataclass(frozen=True)
class Run:
    """One finished run folder, read."""

    path: Path
    label: str
    config: Config
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class Column:
    """One column of the table: a run, or the seeds of one experiment."""

    label: str
    runs: tuple[Run, ...]


def find_runs(patterns: list[str]) -> tuple[list[Run], list[str]]:
    """The finished run folders named by paths or glob patterns, and a note for each path skipped."""
    paths, skipped = [], []
    for pattern in patterns:
        # A folder that exists is itself, whatever characters ([, *, ?) its name holds.
        literal = Path(pattern).exists() or not glob.has_magic(pattern)
        matches = [pattern] if literal else sorted(glob.glob(pattern))
        if not matches:
            skipped.append(f"{pattern}: matches nothing")
        paths += [Path(m) for m in matches]
    folders = []
    for path in dict.fromkeys(paths):  # a folder named twice is one run
        if not (path / "summary.json").is_file():
            skipped.append(f"{path}: {'no summary.json, not a finished run' if path.is_dir() else 'not a folder'}")
        else:
            folders.append(path)
    names = [p.name for p in folders]
    runs = []
    for path in folders:
        try:
            runs.append(
                _read_run(path, path.name if names.count(path.name) == 1 else f"{path.parent.name}/{path.name}")
            )
        except UserError as err:
            skipped.append(str(err))
    return runs, skipped


def _read_run(path: Path, label: str) -> Run:
    """A run folder read and checked; a UserError names the file that is malformed."""
    raw = read_yaml(path / "config.yaml", "run's config")  # with the recipes' limits on depth and aliases
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"{path}: unreadable run folder ({clip(str(err))})") from None
    problem = summary_problem(summary)
    if problem:
        raise UserError(f"{path / 'summary.json'}: unreadable ({problem})")
    try:
        config = from_dict(raw)
    except UserError as err:
        raise UserError(f"{path / 'config.yaml'}: {err}") from None
    return Run(path, label, config, summary, read_metrics(path / "metrics.jsonl"))


def experiment_key(config: Config) -> tuple:
    """What a run trained, as a hashable value: its config without the launch-only keys."""
    flat = flatten(to_dict(config))
    return tuple(sorted((k, v) for k, v in flat.items() if k != "seed" and not is_launch_key(k)))


def group_runs(runs: list[Run]) -> list[Column]:
    """Columns in the order runs were given, seeds of one experiment together."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(experiment_key(run.config), []).append(run)
    columns = []
    for members in groups.values():
        recipe = members[0].config.recipe or members[0].config.name
        label = (
            members[0].label
            if len(members) == 1
            else f"{recipe} (seeds {', '.join(str(r.config.seed) for r in members)})"
        )
        columns.append(Column(_sweep_label(members) or label, tuple(members)))
    return _distinguish(columns)


def _sweep_label(members: list[Run]) -> str | None:
    """`side: sched.name=step (seeds 0, 1)`: a sweep's column is named by the values it varies."""
    sweep = members[0].config.sweep
    if not sweep.name:
        return None
    seeds = ", ".join(str(r.config.seed) for r in members)
    return f"{sweep.name}: {' '.join(sweep.overrides) or 'base'} (seed{'s' if len(members) > 1 else ''} {seeds})"


def _distinguish(columns: list[Column]) -> list[Column]:
    """Append the keys that differ to labels that would otherwise read the same."""
    out = []
    for column in columns:
        twins = [c for c in columns if c.label == column.label]
        if len(twins) == 1:
            out.append(column)
            continue
        mine = dict(experiment_key(column.runs[0].config))
        differs = [k for k in mine if any(dict(experiment_key(t.runs[0].config)).get(k) != mine[k] for t in twins)]
        out.append(Column(f"{column.label} [{', '.join(f'{k}={_num(mine[k])}' for k in differs)}]", column.runs))
    return out


def _num(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_num(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _same(values: tuple[float, ...]) -> str:
    return _num(values[0]) if len(set(values)) == 1 else _num(values)


def transform_text(cfg: Config) -> str:
    """The training transforms in torchvision's words."""
    a = cfg.augment
    parts = [
        f"RandomCrop(32, padding={a.crop_padding})" if a.crop_padding else "",
        f"RandomHorizontalFlip(p={_num(a.hflip)})" if a.hflip else "",
        f"RandomVerticalFlip(p={_num(a.vflip)})" if a.vflip else "",
        f"ColorJitter({_num(a.color_jitter)})" if a.color_jitter else "",
        f"AutoAugment ({a.autoaugment} policy)" if a.autoaugment != "none" else "",
    ]
    return ", ".join(p for p in parts if p) or "none"


def mixing_text(cfg: Config) -> str:
    """CutMix and Mixup as applied per batch: probability and Beta alpha."""
    a = cfg.augment
    parts = [
        f"{name} (p = {_num(m.prob)}, α = {_num(m.alpha)})"
        for name, m in (("CutMix", a.cutmix), ("Mixup", a.mixup))
        if m.prob > 0
    ]
    return ", ".join(parts) or "no"


def model_text(cfg: Config) -> str:
    """The timm model, with the activation override and dropout when set."""
    m = cfg.model
    return (
        m.name
        + (f", every activation → {m.act}" if m.act else "")
        + (f", dropout {_num(m.drop_rate)}" if m.drop_rate else "")
    )


def optimizer_text(cfg: Config) -> str:
    """Optimizer name and the hyper-parameters it uses."""
    o, kind = cfg.optim, OPTIMIZERS[cfg.optim.name]
    details = [f"lr {_num(o.lr)}"]
    if kind.momentum:
        details.append(f"momentum {_num(o.momentum)}" + (", Nesterov" if o.nesterov else ""))
    if o.weight_decay:
        details.append(f"weight decay {_num(o.weight_decay)}")
    return f"{kind.title} ({', '.join(details)})"


def scheduler_text(cfg: Config) -> str:
    """The learning-rate schedule in the seed report's words."""
    s = cfg.sched
    decay = SCHEDULES[s.name].describe(s)
    if s.warmup_epochs:
        return (
            f"linear warmup {_num(s.warmup_lr)} → {_num(cfg.optim.lr)} over {_num(s.warmup_epochs)} epochs, "
            f"then {decay}"
        )
    return decay


def _stat(values: list[float], fmt: Callable[[float], str]) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def _pct(values: list[float]) -> str:
    return _stat([100 * v for v in values], lambda x: f"{x:.2f}") + " %"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def best_text(column: Column) -> str:
    """Test top-1 at the best epoch, naming the split that chose the epoch."""
    s = [r.summary for r in column.runs]
    on = s[0].get("best_selected_on", "test")
    if s[0].get("best_weights") == "ema":
        val = on == "val"
        tops = [x["ema_test_top1_at_best_ema_val" if val else "best_ema_test_top1"] for x in s]
        epochs = [x["best_ema_val_epoch" if val else "best_ema_epoch"] for x in s]
        chosen = f"EMA weights, chosen on {on}"
    elif on == "val":
        tops, epochs = [x["test_top1_at_best_val"] for x in s], [x["best_val_epoch"] for x in s]
        chosen = f"chosen on val (val top-1 {_pct([x['best_val_top1'] for x in s])})"
    else:
        tops, epochs, chosen = [x["best_test_top1"] for x in s], [x["best_epoch"] for x in s], "chosen on test"
    where = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {', '.join(map(str, epochs))}"
    return f"{_pct(tops)} at {where}, {chosen}"


def hardware_text(column: Column) -> str:
    """Processes × device and the precision that ran."""
    s = column.runs[0].summary
    precision = {"no": "fp32"}.get(s["precision"], s["precision"])
    return f"{s['world_size']} × {s['device']}, {precision}"


ROWS: tuple[tuple[str, Callable[[Column], str]], ...] = (
    ("recipe", lambda c: c.runs[0].config.recipe or c.runs[0].config.name),
    ("seed", lambda c: ", ".join(str(r.config.seed) for r in c.runs)),
    ("batch size", lambda c: str(c.runs[0].config.data.batch_size)),
    ("transform", lambda c: transform_text(c.runs[0].config)),
    (
        "normalization",
        lambda c: f"mean {_same(c.runs[0].config.augment.mean)}, std {_same(c.runs[0].config.augment.std)}",
    ),
    ("CutMix / Mixup", lambda c: mixing_text(c.runs[0].config)),
    ("label smoothing", lambda c: _num(c.runs[0].config.augment.label_smoothing or "no")),
    ("model", lambda c: model_text(c.runs[0].config)),
    ("parameters", lambda c: _count(c.runs[0].summary["parameters"])),
    ("optimizer", lambda c: optimizer_text(c.runs[0].config)),
    ("scheduler", lambda c: scheduler_text(c.runs[0].config)),
    ("epochs", lambda c: _same(tuple(r.summary["epochs"] for r in c.runs))),
    ("final top-1 (test)", lambda c: _pct([r.summary["final_test_top1"] for r in c.runs])),
    ("best top-1 (test)", best_text),
    ("time", lambda c: _stat([r.summary["wall_seconds"] for r in c.runs], duration_text)),
    ("hardware", hardware_text),
)


def ema_text(column: Column) -> str:
    """Final test top-1 of the averaged weights, with their decay; "no EMA" for runs without."""
    if "final_ema_test_top1" not in column.runs[0].summary:
        return "no EMA"
    ema = column.runs[0].config.train.ema
    return f"{_pct([r.summary['final_ema_test_top1'] for r in column.runs])} (decay {_num(ema.decay)})"


# Rows shown only when some run has the figure they show.
OPTIONAL_ROWS = (("final top-1, EMA weights (test)", "final_ema_test_top1", ema_text),)


def table(columns: list[Column]) -> list[tuple[str, list[str]]]:
    """The comparison: one (row title, cell per column) pair per row."""
    rows = [(title, [cell(c) for c in columns]) for title, cell in ROWS]
    for title, key, cell in OPTIONAL_ROWS:
        if any(key in r.summary for c in columns for r in c.runs):
            after = next(i for i, (t, _) in enumerate(rows) if t == "final top-1 (test)") + 1
            rows.insert(after, (title, [cell(c) for c in columns]))
    return rows


def verdict(columns: list[Column]) -> str:
    """One line naming the highest final test accuracy (final, so no epoch was picked on test)."""

    def final(c: Column) -> float:
        return statistics.mean(r.summary["final_test_top1"] for r in c.runs)

    top = max(columns, key=final)
    return f"Highest final test top-1: {top.label}, {_pct([r.summary['final_test_top1'] for r in top.runs])}."


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
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def md_text(text: str) -> str:
    """`text` (a run name, a folder, a config value) as Markdown shows it literally: HTML escaped as
    report.html escapes it, Markdown's own marks behind a backslash, one line."""
    text = html.escape(" ".join(text.split()), quote=False)
    return re.sub(r"([\\`*_\[\]|~])", r"\\\1", text)


def md_code(text: str) -> str:
    """`text` as a Markdown code span, fenced by more backticks than it holds in a row."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if text.startswith("`") or text.endswith("`") else f"{fence}{text}{fence}"


def md_link(path: Path) -> str:
    """A relative path as a Markdown link target: spaces and other marks percent-encoded."""
    return urllib.parse.quote(path.as_posix())


def markdown_table(rows: list[tuple[str, list[str]]], columns: list[Column]) -> str:
    """The comparison as a markdown table (also the W&B Report's)."""
    lines = ["| | " + " | ".join(md_text(c.label) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {md_text(title)} | " + " | ".join(md_text(v) for v in values) + " |" for title, values in rows]
    return "\n".join(lines)


def render_markdown(
    rows: list[tuple[str, list[str]]],
    columns: list[Column],
    overlay: list[Path],
    per_run: dict[str, list[Path]],
    out: Path,
) -> str:
    """report.md: the table, the verdict, the overlaid curves and each run's plots (relative links)."""
    lines = [f"# {TITLE}", "", EXPLANATION, "", markdown_table(rows, columns)]
    lines += ["", md_text(verdict(columns)), "", "## All runs overlaid", ""]
    lines += [f"![{md_text(p.stem)}]({md_link(p.relative_to(out))})" for p in overlay]
    lines += ["", "## Each run", ""]
    for column in columns:
        for run in column.runs:
            lines += [f"### {md_text(run.label)}", "", md_code(str(run.path)), ""]
            lines += [
                f"![{md_text(run.label)} {p.stem}]({md_link(p.relative_to(out))})" for p in per_run[run.label]
            ] + [""]
    return "\n".join(lines)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _inline_html(markdown: str) -> str:
    text = html.escape(markdown)
    for pattern, tag in ((r"\*\*(.+?)\*\*", "b"), (r"\*(.+?)\*", "i"), (r"`(.+?)`", "code")):
        text = re.sub(pattern, rf"<{tag}>\1</{tag}>", text)
    return text


def render_html(
    rows: list[tuple[str, list[str]]], columns: list[Column], overlay: list[Path], per_run: dict[str, list[Path]]
) -> str:
    """report.html: the same page with every image embedded, so the one file is the whole report."""
    e = html.escape
    head = "".join(f"<th>{e(c.label)}</th>" for c in columns)
    body = "".join(
        f"<tr><th>{e(title)}</th>" + "".join(f"<td>{e(v)}</td>" for v in values) + "</tr>" for title, values in rows
    )
    runs = "".join(
        f'<section class="run"><h3>{e(r.label)}</h3><p><code>{e(str(r.path))}</code></p>'
        + "".join(_img(p, f"{r.label} {p.stem}") for p in per_run[r.label])
        + "</section>"
        for c in columns
        for r in c.runs
    )
    curves = "".join(_img(p, p.stem) for p in overlay)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{TITLE}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }}
thead th {{ background: #eef; }} tbody th {{ background: #f6f6f6; white-space: nowrap; }}
img {{ max-width: 100%; margin: 0.3em; border: 1px solid #ddd; }}
.verdict {{ font-weight: bold; }}
</style></head>
<body>
<h1>{TITLE}</h1>
<p>{_inline_html(EXPLANATION)}</p>
<table id="comparison"><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>
<p class="verdict">{e(verdict(columns))}</p>
<h2>All runs overlaid</h2>
{curves}
<h2>Each run</h2>
{runs}
</body></html>
"""


def make_report(patterns: list[str], out: Path) -> tuple[Path, list[Column], list[str]]:
    """Write report.md, report.html and their images into `out`; returns report.md, the columns and skip notes."""
    runs, skipped = find_runs(patterns)
    if not runs:
        raise UserError(f"no finished run folder (one with summary.json) in: {'; '.join(skipped)}")
    columns = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    overlay, per_run = plot_overlay(columns, out), {}
    for run in runs:
        folder = out / "runs" / run.label.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        per_run[run.label] = plot_history(run.rows, folder, run.label)
    rows = table(columns)
    (out / "report.md").write_text(render_markdown(rows, columns, overlay, per_run, out))
    (out / "report.html").write_text(render_html(rows, columns, overlay, per_run))
    return out / "report.md", columns, skipped
