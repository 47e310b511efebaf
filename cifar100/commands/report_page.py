"""`cifar100 report`'s page: the comparison table's cells in the seed report's words, and the page
as Markdown (report.md, the W&B Report's table) and as one self-contained HTML file (report.html).

Every text from a run folder (names, paths, config values) is taken literally: escaped for
Markdown and HTML, never read as markup.
"""

from __future__ import annotations

import base64
import html
import re
import statistics
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from cifar100.commands.report_runs import Column, value_text
from cifar100.config import Config
from cifar100.training.eta import duration_text
from cifar100.training.optim import OPTIMIZERS, SCHEDULES

TITLE = "CIFAR-100 runs compared"

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


def _same(values: tuple[float, ...]) -> str:
    return value_text(values[0]) if len(set(values)) == 1 else value_text(values)


def transform_text(cfg: Config) -> str:
    """The training transforms in torchvision's words."""
    a = cfg.augment
    parts = [
        f"RandomCrop(32, padding={a.crop_padding})" if a.crop_padding else "",
        ("alternating flip" if a.hflip == "alternating" else f"RandomHorizontalFlip(p={value_text(a.hflip)})")
        if a.hflip
        else "",
        f"RandomVerticalFlip(p={value_text(a.vflip)})" if a.vflip else "",
        f"ColorJitter({value_text(a.color_jitter)})" if a.color_jitter else "",
        f"AutoAugment ({a.autoaugment} policy)" if a.autoaugment != "none" else "",
    ]
    return ", ".join(p for p in parts if p) or "none"


def mixing_text(cfg: Config) -> str:
    """CutMix and Mixup as applied per batch: probability and Beta alpha."""
    a = cfg.augment
    parts = [
        f"{name} (p = {value_text(m.prob)}, α = {value_text(m.alpha)})"
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
        + (f", dropout {value_text(m.drop_rate)}" if m.drop_rate else "")
    )


def optimizer_text(cfg: Config) -> str:
    """Optimizer name and the hyper-parameters it uses."""
    o, kind = cfg.optim, OPTIMIZERS[cfg.optim.name]
    details = [f"lr {value_text(o.lr)}"]
    if kind.momentum:
        details.append(f"momentum {value_text(o.momentum)}" + (", Nesterov" if o.nesterov else ""))
    if o.weight_decay:
        details.append(f"weight decay {value_text(o.weight_decay)}")
    if kind.hidden:
        m = o.muon
        details.append(
            f"Muon lr {value_text(m.lr)}, momentum {value_text(m.momentum)}, {m.ns_steps} Newton-Schulz steps"
        )
    if o.lookahead.steps:
        details.append(f"lookahead k {o.lookahead.steps}, alpha {value_text(o.lookahead.alpha)}")
    return f"{kind.title} ({', '.join(details)})"


def scheduler_text(cfg: Config) -> str:
    """The learning-rate schedule in the seed report's words."""
    s = cfg.sched
    decay = SCHEDULES[s.name].describe(s)
    if s.warmup_epochs:
        warmup = f"{value_text(s.warmup_lr)} → {value_text(cfg.optim.lr)} over {value_text(s.warmup_epochs)} epochs"
        return f"linear warmup {warmup}, then {decay}"
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
    ("label smoothing", lambda c: value_text(c.runs[0].config.augment.label_smoothing or "no")),
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
    return f"{_pct([r.summary['final_ema_test_top1'] for r in column.runs])} (decay {value_text(ema.decay)})"


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
