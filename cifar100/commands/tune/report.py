"""`cifar100 report` of a search's folder: report.md (a table per rung, the chosen setting, planned
against spent process time, the seeded re-runs' test mean ± std) and halving.png (each trial's
score against its steps: the successive-halving picture), both written into the folder."""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from matplotlib.ticker import NullFormatter

from cifar100.commands.sweep import _text as value_text
from cifar100.commands.tune.controller import STATE, name_of
from cifar100.commands.tune.plan import SearchPlan
from cifar100.runfolder.safe_files import MiB, read_json, write_atomic
from cifar100.runfolder.tracking import plt


def is_search(path: Path) -> bool:
    """Whether `path` is a search's folder (it holds the controller's state file)."""
    return (path / STATE).is_file()


def _setting(values: dict[str, Any]) -> str:
    return " ".join(f"`{k}={value_text(v)}`" for k, v in values.items())


def _pct(score: float | None) -> str:
    return "failed" if score is None else f"{score:.2%}"


def write_report(folder: Path) -> Path:
    """report.md and halving.png of the search in `folder`; returns report.md's path."""
    state = read_json(folder / STATE, 16 * MiB, "the search's state file")
    plan = SearchPlan.from_dict(state["plan"])
    lines = [
        f"# Search {state['name']}",
        "",
        f"`{state['file']}`, budget={state['budget']}: {len(state['settings'])} trials, {len(plan.rungs)} rungs, "
        f"reduction factor {plan.reduction}; every rung scored on the validation split after a cooldown branch of "
        f"{plan.cooldown:g} of its length.",
        "",
        *_chosen(state.get("winner")),
        *_reruns(state.get("reruns", {}), state["settings"]),
        *_budget(state, plan),
    ]
    for rung in range(len(plan.rungs)):
        lines += _rung(state, plan, rung)
    _plot(folder / "halving.png", plan, state["results"])
    lines += ["![score against steps, a line per trial](halving.png)", ""]
    out = folder / "report.md"
    write_atomic(out, "\n".join(lines).encode())
    return out


def _chosen(winner: dict[str, Any] | None) -> list[str]:
    """The report's section on the setting the search chose, once it has."""
    if not winner:
        return ["## Chosen setting", "", "Not yet: the search has not finished its rungs.", ""]
    return [
        "## Chosen setting",
        "",
        f"Trial {winner['trial']} ({name_of(winner['trial'])}): {_setting(winner['setting'])}: its whole run "
        f"(the top rung's cooldown branch) reached {_pct(winner['val_top1'])} validation top-1, "
        f"{_pct(winner['test_top1'])} test top-1.",
        "",
    ]


def _reruns(reruns: dict[str, dict[str, Any]], settings: list[dict[str, Any]]) -> list[str]:
    """The report's table of the seeded re-runs' test scores (nothing before there are any)."""
    if not reruns:
        return []
    lines = [
        "## Seeded re-runs, scored on the test split",
        "",
        "| trial | setting | seeds | test top-1 |",
        "|---|---|---|---|",
    ]
    for index, rerun in reruns.items():
        scores = rerun.get("test_top1", [])
        mean = statistics.mean(scores) if scores else None
        spread = f" ± {statistics.stdev(scores):.2%}" if len(scores) > 1 else ""
        shown = "none finished" if mean is None else f"{mean:.2%}{spread}"
        lines.append(f"| {name_of(int(index))} | {_setting(settings[int(index)])} | {len(scores)} | {shown} |")
    return [*lines, ""]


def _budget(state: dict[str, Any], plan: SearchPlan) -> list[str]:
    """The report's table of process time, planned and spent, rung by rung."""
    lines = ["## Budget (process time)", "", "| | planned | spent |", "|---|---|---|"]
    spent_total = 0.0
    for rung, r in enumerate(plan.rungs):
        spent = sum(x["seconds"] for x in state["results"].get(str(rung), {}).values())
        spent_total += spent
        lines.append(f"| rung {rung} | {r.seconds:.0f} s | {spent:.0f} s |")
    return [
        *lines,
        f"| all rungs | {plan.seconds:.0f} s of {plan.budget_seconds:.0f} s | {spent_total:.0f} s |",
        f"| measuring the rate | | {state.get('probe_seconds', 0):.0f} s |",
        f"| seeded re-runs (after the budget) | {plan.rerun_seconds:.0f} s each | "
        f"{sum(r.get('seconds', 0) for r in state.get('reruns', {}).values()):.0f} s |",
        "",
    ]


def _rung(state: dict[str, Any], plan: SearchPlan, rung: int) -> list[str]:
    """The report's table of one rung: each trial's score and fate (promoted, stopped, failed, the winner)."""
    r, winner = plan.rungs[rung], state.get("winner")
    going = state["promoted"].get(str(rung))
    lines = [
        f"## Rung {rung}: {r.steps} constant-rate steps + {r.cooldown} cooldown steps",
        "",
        "| trial | setting | val top-1 | |",
        "|---|---|---|---|",
    ]
    for index, result in sorted(state["results"].get(str(rung), {}).items(), key=lambda kv: int(kv[0])):
        if result.get("score") is None:
            fate = f"failed: {result.get('error', '')}"
        elif going is None:
            fate = "the winner" if rung == len(plan.rungs) - 1 and winner and int(index) == winner["trial"] else ""
        else:
            fate = "promoted" if int(index) in going else "stopped"
        setting = _setting(state["settings"][int(index)])
        lines.append(f"| {name_of(int(index))} | {setting} | {_pct(result.get('score'))} | {fate} |")
    return [*lines, ""]


def _plot(path: Path, plan: SearchPlan, results: dict[str, dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    trials = sorted({int(i) for rung in results.values() for i in rung})
    for index in trials:
        points = [
            (plan.rungs[int(rung)].steps + plan.rungs[int(rung)].cooldown, done[str(index)]["score"])
            for rung, done in sorted(results.items(), key=lambda kv: int(kv[0]))
            if str(index) in done and done[str(index)].get("score") is not None
        ]
        if points:
            ax.plot(*zip(*points), marker="o", label=name_of(index))
    ax.set_xscale("log")
    # Ticks at the rungs' lengths, written plainly: the log axis's own labels are mathtext, and every
    # plot's text is literal here (tracking.py).
    lengths = [r.steps + r.cooldown for r in plan.rungs]
    ax.set_xticks(lengths, labels=[str(n) for n in lengths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer steps (constant rate + cooldown)")
    ax.set_ylabel("validation top-1")
    ax.set_title("successive halving")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
