"""The one table and JSON of `bench/gpu.sh`, from what its sections left in its work folder.

Usage: python bench/gpu_report.py WORK_DIR OUT_DIR

Reads WORK_DIR/step*.json (`cifar100 bench step`), WORK_DIR/runs/e2e-*/ (train.py run folders) and
WORK_DIR/*.rc (each section's exit status, or "skipped"), prints one table and writes
OUT_DIR/<date>-<card>-fulldata.json (the bench/results naming). A section that failed or did not
run is a row that says so; the others are reported as they are.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

import yaml

from cifar100.commands.bench import print_table
from cifar100.runfolder.tracking import read_metrics

RUN_EPOCHS = 200  # the recipe's length, for the projection


def step_rows(work: Path) -> tuple[list[dict], dict]:
    """One row per measured step variant, with its speed against the eager row of the same process."""
    table, raw = [], {}
    for path in sorted(work.glob("step*.json")):
        result = json.loads(path.read_text())
        raw[path.stem] = result
        eager = next(
            (
                r
                for r in result["step"]
                if r["loop"] == "engine"
                and r["compile_mode"] is None
                and r["channels_last"]
                and r["cudnn_benchmark"] is not False
            ),
            None,
        )
        for r in result["step"]:
            variant = (
                f"{r['precision']}, {'channels_last' if r['channels_last'] else 'NCHW'}, "
                + (f"compile {r['compile_mode']}" if r["compile_mode"] else "eager")
                + (", plain loop" if r["loop"] == "plain" else "")
                + (", no cudnn autotune" if r["cudnn_benchmark"] is False else "")
            )
            notes = [f"mfu {r['mfu']:.1%}"]
            if r["graph_breaks"] is not None:
                notes.append(f"graph breaks {r['graph_breaks']}")
            if r["host_waits_per_step"] is not None:
                notes.append(f"host waits/step {r['host_waits_per_step']:.2f}")
            table.append(
                {
                    "section": path.stem,
                    "variant": variant,
                    "epoch": "",
                    "images_per_second": r["images_per_second"],
                    "vs_step": r["images_per_second"] / eager["images_per_second"] if eager else None,
                    "eval_s": None,
                    "checkpoint_s": None,
                    "test_top1": None,
                    "note": "; ".join(notes),
                }
            )
        if result.get("partial"):
            table.append(_status_row(path.stem, "stopped before its last variant (rows above were measured)"))
    return table, raw


def matching_step_rate(raw: dict, cfg: dict, precision: str) -> float | None:
    """The eager step rate of exactly what the end-to-end run trained (precision, layout, autotuner on)."""
    for result in raw.values():
        for r in result["step"]:
            if (
                r["loop"] == "engine"
                and r["compile_mode"] is None
                and r["cudnn_benchmark"] is not False
                and r["channels_last"] == cfg["train"]["channels_last"]
                and r["precision"] == precision
            ):
                return r["images_per_second"]
    return None


def e2e_rows(run: Path, step_rate: float | None) -> tuple[list[dict], dict]:
    """Per-epoch rows of one train.py run, and its end-to-end totals (epochs after the first, which
    pays cuDNN's autotuning and the workers' start)."""
    metrics = read_metrics(run / "metrics.jsonl")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    table = []
    for m in metrics:
        m["images"] = m["images_per_second"] * m["epoch_seconds"]
        m["total_seconds"] = m["epoch_seconds"] + m.get("eval_seconds", 0.0) + m.get("checkpoint_seconds", 0.0)
        table.append(
            {
                "section": run.name,
                "variant": "epoch",
                "epoch": m["epoch"],
                "images_per_second": m["images_per_second"],
                "vs_step": m["images_per_second"] / step_rate if step_rate else None,
                "eval_s": m.get("eval_seconds"),
                "checkpoint_s": m.get("checkpoint_seconds"),
                "test_top1": m["test_top1"],
                "note": "",
            }
        )
    steady = metrics[1:] or metrics
    totals = {"epochs": len(metrics), "step_images_per_second": step_rate, "wall_seconds": summary.get("wall_seconds")}
    # The speedrun's clock: training time to the final epoch (compilation in the first epoch included),
    # evaluations and checkpoints left out; the run's wall time beside it.
    totals["train_seconds_to_final_epoch"] = sum(m["epoch_seconds"] for m in metrics)
    plan = summary.get("plan")
    if steady:
        seconds = sum(m["total_seconds"] for m in steady)
        rate = sum(m["images"] for m in steady) / seconds
        totals.update(
            end_to_end_images_per_second=rate,
            ratio_to_step=rate / step_rate if step_rate else None,
            epochs_counted=[steady[0]["epoch"], steady[-1]["epoch"]],
            projected_run_seconds=RUN_EPOCHS * seconds / len(steady),
            final_test_top1=metrics[-1]["test_top1"],
        )
        table.append(
            {
                "section": run.name,
                "variant": f"end to end, epochs {steady[0]['epoch']}-{steady[-1]['epoch']}",
                "epoch": "",
                "images_per_second": rate,
                "vs_step": totals["ratio_to_step"],
                "eval_s": sum(m.get("eval_seconds", 0.0) for m in steady) / len(steady),
                "checkpoint_s": sum(m.get("checkpoint_seconds", 0.0) for m in steady) / len(steady),
                "test_top1": metrics[-1]["test_top1"],
                "note": (
                    f"budget {plan['budget_seconds']:.0f} s: {plan['steps']} steps planned, ended at "
                    f"{plan['ended_seconds']:.0f} s, {len(plan['replans'])} re-plan(s)"
                    if plan
                    else _speedrun_note(totals)
                    if run.name == "fast"
                    else f"{RUN_EPOCHS} epochs at this rate: {totals['projected_run_seconds'] / 60:.1f} min"
                ),
            }
        )
    return table, {"metrics": metrics, "summary": summary, "totals": totals}


def _speedrun_note(totals: dict) -> str:
    wall = totals["wall_seconds"]
    return (
        f"{totals['epochs']} epochs: {totals['train_seconds_to_final_epoch']:.1f} s of training to the final epoch"
        + (f", {wall:.0f} s end to end" if wall else "")
    )


def _status_row(section: str, note: str) -> dict:
    return {
        "section": section,
        "variant": "",
        "epoch": "",
        "images_per_second": None,
        "vs_step": None,
        "eval_s": None,
        "checkpoint_s": None,
        "test_top1": None,
        "note": note,
    }


def this_device() -> str:
    """This machine's device, named as `cifar100 bench` names it, for a report without step rows."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def card_name(device: str) -> str:
    """h100, h200, ... from the device's name; cpu off a GPU."""
    found = re.search(r"\b([A-Z]\d{2,3})\b", device)
    return found.group(1).lower() if found else ("cpu" if device.startswith("cpu") else "gpu")


def main(work: Path, out: Path) -> Path:
    table, raw = step_rows(work)
    runs = {}
    for run in sorted(
        [*(work / "runs").glob("e2e-*"), *(work / "runs").glob("best-budget"), *(work / "runs").glob("fast")]
    ):
        if not (run / "metrics.jsonl").is_file():
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        rate = matching_step_rate(raw, cfg, summary.get("precision", cfg["train"]["precision"]))
        rows, runs[run.name] = e2e_rows(run, rate)
        table += rows
    if {"e2e-reference", "e2e-device"} <= runs.keys():
        by_epoch = {m["epoch"]: m["test_top1"] for m in runs["e2e-reference"]["metrics"]}
        gaps = {
            m["epoch"]: m["test_top1"] - by_epoch[m["epoch"]]
            for m in runs["e2e-device"]["metrics"]
            if m["epoch"] in by_epoch
        }
        runs["top1_device_minus_reference"] = gaps
    sections = {}
    for rc in sorted(work.glob("*.rc")):
        status = rc.read_text().strip()
        sections[rc.stem] = status
        if status != "0":
            note = {"124": "timed out (its time share ran out)", "137": "killed after timing out"}.get(
                status, f"exit status {status}"
            )
            table.append(
                _status_row(rc.stem, "skipped: no time left" if status == "skipped" else f"failed: {note}; see the log")
            )
    device = next((r["device"] for r in raw.values()), None) or this_device()
    print(f"device: {device}")
    print_table(table)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.date.today().isoformat()}-{card_name(device)}-fulldata.json"
    path.write_text(
        json.dumps({"device": device, "sections": sections, "table": table, "step": raw, "e2e": runs}, indent=2) + "\n"
    )
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
