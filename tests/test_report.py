"""Multi-seed training, `cifar100 report` (markdown, HTML in a real Chromium) and W&B, on real smoke runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, run_cmd
from PIL import Image

from cifar100.cli import main
from cifar100.commands.report import make_report
from cifar100.commands.report_page import markdown_table, table
from cifar100.commands.report_runs import find_runs, group_runs
from cifar100.config import load_config, to_dict, to_yaml
from cifar100.training.eta import duration_text

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_data) -> Path:
    """`train.py recipe=smoke seeds=[0,1]` with offline W&B, plus one smoke run whose best epoch is chosen on val."""
    log_dir = tmp_path_factory.mktemp("runs")
    seeds = run_cmd(
        [
            sys.executable,
            "train.py",
            "recipe=smoke",
            "seeds=[0,1]",
            "log.wandb.mode=offline",
            f"data.root={real_data}",
            f"log.dir={log_dir}",
        ],
        env={"WANDB_MODE": "offline"},
    )
    assert seeds.returncode == 0, seeds.stderr[-3000:]
    assert f"compare them: cifar100 report {log_dir / 'smoke-s0'} {log_dir / 'smoke-s1'}" in seeds.stdout
    val = run_cmd(
        [
            sys.executable,
            "train.py",
            "recipe=smoke",
            "name=val",
            "data.val_size=100",
            "train.epochs=1",
            f"data.root={real_data}",
            f"log.dir={log_dir}",
        ]
    )
    assert val.returncode == 0, val.stderr[-3000:]
    return log_dir


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def md_table(text: str) -> dict[str, list[str]]:
    """The report's table as {row title: cells}; the header row is under ""."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    split = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    return {cells[0]: cells[1:] for cells in split}


@pytest.mark.slow
def test_seeds_train_one_run_each_into_sibling_folders(runs):
    for seed in (0, 1):
        folder = runs / f"smoke-s{seed}"
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (config["name"], config["seed"], summary(folder)["seed"]) == (f"smoke-s{seed}", seed, seed)
    losses = [
        [json.loads(line)["train_loss"] for line in (runs / f"smoke-s{s}" / "metrics.jsonl").read_text().splitlines()]
        for s in (0, 1)
    ]
    assert losses[0] != losses[1]  # the seed reached the training


@pytest.mark.slow
def test_report_groups_seeds_and_names_the_split_that_chose_the_best_epoch(runs, tmp_path):
    (runs / "notes").mkdir(exist_ok=True)  # a folder the glob catches that is not a run
    md_path, _columns, skipped = make_report([str(runs / "*")], tmp_path / "report")
    assert skipped == [f"{runs / 'notes'}: no summary.json, not a finished run"]
    cells = md_table(md_path.read_text())
    assert cells[""] == ["smoke (seeds 0, 1)", "val"]
    s0, s1, val = summary(runs / "smoke-s0"), summary(runs / "smoke-s1"), summary(runs / "val")

    def pm(values):
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"

    assert cells["seed"] == ["0, 1", "0"]
    assert cells["final top-1 (test)"] == [
        pm([s0["final_test_top1"], s1["final_test_top1"]]),
        f"{100 * val['final_test_top1']:.2f} %",
    ]
    assert cells["best top-1 (test)"] == [
        f"{pm([s0['best_test_top1'], s1['best_test_top1']])} at epochs {s0['best_epoch']}, {s1['best_epoch']}, "
        "chosen on test",
        f"{100 * val['test_top1_at_best_val']:.2f} % at epoch 1, chosen on val "
        f"(val top-1 {100 * val['best_val_top1']:.2f} %)",
    ]
    assert cells["time"][0] == (
        f"{duration_text(statistics.mean([s0['wall_seconds'], s1['wall_seconds']]))} ± "
        f"{duration_text(statistics.stdev([s0['wall_seconds'], s1['wall_seconds']]))}"
    )
    assert cells["epochs"] == ["2", "1"] and cells["hardware"] == ["1 × cpu, fp32", "1 × cpu, fp32"]
    # Every image the markdown links is there, beside it.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    assert len(links) == 2 + 2 * 3 and all((md_path.parent / link).read_bytes()[:4] == b"\x89PNG" for link in links)


@pytest.mark.slow
def test_table_cells_for_the_seed_recipes(runs, tmp_path):
    # Run folders as `cifar100 show recipe=NAME` resolves them, with a real run's summary and metrics.
    for name in ("exp1", "exp2", "exp3", "best"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(to_yaml(load_config(name, [])))
        for file in ("summary.json", "metrics.jsonl"):
            shutil.copy(runs / "smoke-s0" / file, folder / file)
    md_path, _, _ = make_report([str(tmp_path / n) for n in ("exp1", "exp2", "exp3", "best")], tmp_path / "report")
    cells = md_table(md_path.read_text())
    crop, aa, per_channel = (
        "RandomCrop(32, padding=4)",
        "AutoAugment (cifar10 policy)",
        "mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762)",
    )
    assert cells[""] == ["exp1", "exp2", "exp3", "best"]
    assert cells["batch size"] == ["128", "512", "512", "512"]
    assert cells["transform"] == [
        f"{crop}, RandomHorizontalFlip(p=0.5)",
        f"{crop}, RandomHorizontalFlip(p=0.5), {aa}",
        f"{crop}, RandomHorizontalFlip(p=0.8), {aa}",
        f"{crop}, RandomHorizontalFlip(p=0.5), {aa}",
    ]
    assert cells["normalization"] == ["mean 0.5, std 0.5", "mean 0.5, std 0.5", per_channel, per_channel]
    assert cells["CutMix / Mixup"] == ["no", "no", "CutMix (p = 1, α = 1)", "CutMix (p = 1, α = 1)"]
    assert cells["model"] == ["resnet50", "resnet50", "resnet50", "seresnet50, every activation → mish"]
    assert cells["optimizer"] == [
        "SGD (lr 0.1, momentum 0.9, weight decay 0.0005)",
        "Adam (lr 0.001)",
        "NAdam (lr 0.002)",
        "SGD (lr 0.2, momentum 0.9, weight decay 0.0005)",
    ]
    assert cells["scheduler"] == ["CosineAnnealingLR"] * 3 + [
        "linear warmup 0.0001 → 0.2 over 5 epochs, then CosineAnnealingLR"
    ]
    s0 = summary(runs / "smoke-s0")
    assert cells["final top-1 (test)"] == [f"{100 * s0['final_test_top1']:.2f} %"] * 4
    assert (
        cells["best top-1 (test)"]
        == [f"{100 * s0['best_test_top1']:.2f} % at epoch {s0['best_epoch']}, chosen on test"] * 4
    )


class _Dom(HTMLParser):
    """The parts of Chromium's DOM dump the checks need: table cells and each image's attributes."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self._text = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td"):
            self._text = []
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._text is not None:
            self.cells.append("".join(self._text).strip())
            self._text = None


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={cwd / 'profile'}",
        "--window-size=1200,2000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_report_html_renders_in_chromium(runs, tmp_path):
    md_path, columns, _ = make_report([str(runs / "smoke-s*"), str(runs / "val")], tmp_path / "report")
    page = md_path.with_suffix(".html")
    text = page.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)  # nothing outside the file is referenced
    # A copy with a probe: after load, each image says whether it decoded; a broken one is the control.
    probe = tmp_path / "probe.html"
    probe.write_text(
        text.replace(
            "</body>",
            '<img id="control" src="data:image/png;base64,AAAA" alt="control">'
            "<script>window.addEventListener('load', () => { for (const i of document.images) "
            "i.setAttribute('data-rendered', i.complete && i.naturalWidth > 0 ? "
            "i.naturalWidth + 'x' + i.naturalHeight : 'no'); });</script></body>",
        )
    )
    dump = chromium("--dump-dom", probe.as_uri(), cwd=tmp_path)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = _Dom()
    dom.feed(dump.stdout)
    rows = table(columns)
    assert dom.cells[: 1 + len(columns)] == ["", "smoke (seeds 0, 1)", "val"]
    body = dom.cells[1 + len(columns) : (1 + len(columns)) * (1 + len(rows))]
    assert body == [cell for title, values in rows for cell in (title, *values)]  # the whole table, as rendered
    rendered = {img["alt"]: img.get("data-rendered") for img in dom.images}
    assert rendered.pop("control") == "no"
    assert len(rendered) == 2 + 2 * 3 and all(size in ("800x500", "600x400") for size in rendered.values()), rendered

    shot = tmp_path / "shot.png"
    out = chromium(f"--screenshot={shot}", page.as_uri(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.02  # text, table lines and plots, not a blank page


@pytest.mark.slow
def test_offline_run_records_checkpoints_as_a_model_artifact(runs, tmp_path, capsys, wandb_in_process):
    from accelerate import Accelerator
    from wandb.proto.wandb_internal_pb2 import ArtifactRecord

    from cifar100.runfolder.tracking import finish_tracking, start_wandb

    run_dir = tmp_path / "smoke-s0"
    shutil.copytree(runs / "smoke-s0", run_dir, symlinks=True, ignore=shutil.ignore_patterns("wandb"))
    config = to_dict(load_config("smoke", []))
    accelerator = Accelerator(cpu=True, log_with="wandb")
    run_id = start_wandb(accelerator, "cifar100", None, "offline", run_dir, run_dir.name, config)
    assert run_id
    finish_tracking(accelerator, run_dir, summary(run_dir))
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    assert f"wandb sync {offline}" in capsys.readouterr().out
    # The transaction log (protobuf) stores strings verbatim: the config, the summary, two artifact records.
    alias_tag = ArtifactRecord.DESCRIPTOR.fields_by_name["aliases"].number << 3 | 2  # a length-delimited field
    wanted = [
        b"cifarnet_tiny",
        b"final_test_top1",
        b"best_selected_on",
        bytes([alias_tag, 4]) + b"best",
        bytes([alias_tag, 4]) + b"last",
    ]
    deadline = time.monotonic() + 30
    while True:  # W&B's service process may still be writing the log when finish() returns
        log = (offline / f"run-{run_id}.wandb").read_bytes()
        if all(w in log for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [w for w in wanted if w not in log] == []
    assert log.count(f"model-{run_id}".encode()) == 2
    for tag in ("best", "last"):  # referenced in place, not copied: `last` is followed to its step folder
        assert str((run_dir / "checkpoints" / tag).resolve() / "model.safetensors").encode() in log


@pytest.mark.slow
def test_wandb_report_object_is_built_without_network(runs):
    import wandb_workspaces.reports.v2 as wr

    from cifar100.commands.wandb_report import build_report, publish, run_ids

    columns = group_runs(find_runs([str(runs / "smoke-s*")])[0])
    table_md = markdown_table(table(columns), columns)
    report = build_report(columns, table_md, entity="someone")
    assert (report.entity, report.project, report.title) == ("someone", "cifar100", "CIFAR-100 runs compared")
    _heading, markdown, _, grid = report.blocks
    assert isinstance(markdown, wr.MarkdownBlock) and markdown.text == table_md
    (runset,) = grid.runsets
    ids = [i for s in (0, 1) for i in run_ids(runs / f"smoke-s{s}")]
    assert len(ids) == 2 and all(i in runset.filters for i in ids) and runset.filters.startswith('Metric("ID") in')
    assert (runset.entity, runset.project, runset.groupby) == ("someone", "cifar100", ["group"])
    lines = [p for p in grid.panels if isinstance(p, wr.LinePlot)]
    assert [p.y for p in lines] == [["test_top1", "train_top1"], ["test_loss", "train_loss"]]
    assert all(p.groupby_rangefunc == "stddev" for p in lines)
    (bars,) = [p for p in grid.panels if isinstance(p, wr.BarPlot)]
    assert [m.name for m in bars.metrics] == ["final_test_top1", "best_test_top1"]
    # Runs trained without W&B have nothing to show there: said at once, no network needed.
    assert publish(group_runs(find_runs([str(runs / "val")])[0]), table_md, "rerun").startswith(
        "W&B report not made: none of these runs has a W&B run"
    )


@pytest.mark.slow
def test_report_with_wandb_offline_says_what_to_run_and_still_writes_the_page(runs, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no credentials from here
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")  # nor from ~/.netrc
    out = subprocess.run(
        [sys.executable, "-m", "cifar100", "report", str(runs / "smoke-s*"), f"out={tmp_path / 'r'}", "wandb=true"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    pending = sorted(str(p) for s in (0, 1) for p in (runs / f"smoke-s{s}" / "wandb").glob("offline-run-*"))
    assert "W&B report not published: no W&B credentials" in out.stdout
    assert "  wandb login\n" in out.stdout and f"  wandb sync {' '.join(pending)}\n" in out.stdout
    assert f"  cifar100 report {shlex.quote(str(runs / 'smoke-s*'))} out={tmp_path / 'r'} wandb=true" in out.stdout
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()


def test_report_without_runs_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing*")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no finished run folder") and "matches nothing" in err and err.count("\n") == 1


def test_seeds_mistakes_are_one_line(capsys, monkeypatch):
    for args, message in [
        (("seeds=3",), "expected a list of distinct integers"),
        (("seeds=[0,0]",), "expected a list of distinct integers"),
        (("seeds=[0,1]", "seed=2"), "not both"),
        (("seeds=[0,-1]",), "seeds=[0,-1]: seed=-1: must be at least 0"),
        (("seeds=[4294967296]",), "seed=4294967296: must be at most 4294967295"),
    ]:
        assert main(["train", "recipe=smoke", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: one launch per seed instead, said how
    assert main(["train", "recipe=smoke", "seeds=[0,1]"]) == 2
    assert "for s in 0 1; do accelerate launch" in capsys.readouterr().err
