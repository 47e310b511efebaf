"""`cifar100 bench`: real timings of real work, printed and saved."""

from __future__ import annotations

import dataclasses
import json

import pytest

# Slow, and some tests make Accelerators (and so Accelerate's process-wide state) themselves.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("accelerate_state")]


def test_bench_recipe_measures_step_data_and_projects(cli, tmp_path, real_data):
    out = cli(
        "bench",
        "recipe",
        "recipe=smoke",
        f"data.root={real_data}",
        "steps=3",
        "warmup=1",
        "batches=3",
        "compile=false",
        "augment.autoaugment=none",
        f"json={tmp_path / 'b.json'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "b.json").read_text())
    step = result["step"]
    assert [(r["precision"], r["channels_last"], r["loop"]) for r in step] == [
        ("no", True, "engine"),
        ("no", False, "engine"),
        ("no", True, "plain"),
    ]
    assert all(r["images_per_second"] > 0 and 0 < r["mfu"] and r["host_waits_per_step"] is None for r in step)
    data = {r["pipeline"]: r["images_per_second"] for r in result["data"]}
    assert data["reference"] > 0 and data["device"] > 0
    projection = result["projection"]
    assert projection["epoch_seconds"] == pytest.approx(
        400 / min(projection["step_images_per_second"], projection["data_images_per_second"])
    )
    assert projection["run_seconds"] == pytest.approx(projection["epoch_seconds"] * 2)
    assert "images_per_second" in out.stdout and "bound_by" in out.stdout


def test_the_step_bench_times_is_the_one_a_run_trains(real_data):
    """bench builds the recipe's step as a run builds it (step_parts.build_step): recipe=cpu's whitened
    stem is frozen in both, both optimizers train the same parameters in the same groups, and the
    engine row trains: its weights move."""
    import time

    import torch

    from cifar100.commands.bench import step_runner
    from cifar100.config import load_config
    from cifar100.preemption import StopFlag
    from cifar100.training.trainer import Trainer

    cfg = load_config("cpu", [f"data.root={real_data}", "data.train_limit=512", "data.batch_size=16"])

    def layout(model, optimizer):
        frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
        names = {id(p): n for n, p in model.named_parameters()}
        return frozen, [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]

    run, parts, _, _, _ = step_runner(cfg, "no", True, None, "engine")
    prepared = parts.prepared
    benched = layout(prepared, parts.optimizer)
    before = [p.detach().clone() for p in prepared.parameters() if p.requires_grad]
    run(2)
    moved = [not torch.equal(a, p) for a, p in zip(before, (p for p in prepared.parameters() if p.requires_grad))]
    trainer = Trainer(cfg, StopFlag(), time.perf_counter())
    assert benched == layout(trainer.state.model, trainer.engine.optimizer)
    assert benched[0] == ["stem.0.weight"] and all(moved)


def test_device_path_refusal_is_reported_not_fatal(cli, real_data):
    out = cli("bench", "data", "recipe=smoke", f"data.root={real_data}", "batches=2", "augment.color_jitter=0.4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no batched ColorJitter" in out.stdout


def test_bench_usage_errors(cli):
    from cifar100.cli import main

    assert main(["bench"]) == 2  # the command line's own parsing, here; below as a real command
    bad = cli("bench", "step", "steps=many")
    assert bad.returncode == 2 and "steps='many': expected a whole number" in bad.stderr


def test_bench_checkpoint_times_both_writes_and_leaves_nothing(cli, tmp_path):
    out = cli("bench", "checkpoint", "recipe=smoke", f"log.dir={tmp_path}", f"json={tmp_path / 'c.json'}")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "c.json").read_text())["checkpoint"]
    assert [r["write"] for r in rows] == ["foreground", "background"]
    assert all(r["megabytes"] > 0 and 0 < r["training_waits_s"] <= r["on_disk_after_s"] for r in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_recipe_train_compile_with_compile_false_projects_from_eager_with_a_note(cli, tmp_path, real_data):
    out = cli(
        "bench",
        "recipe",
        "recipe=smoke",
        f"data.root={real_data}",
        "steps=2",
        "warmup=0",
        "batches=2",
        "augment.autoaugment=none",
        "train.compile=true",
        "train.channels_last=true",
        "compile=false",
        f"json={tmp_path / 'b.json'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "b.json").read_text())
    own = next(r for r in result["step"] if r["loop"] == "engine" and r["channels_last"] and not r["compile"])
    assert result["projection"]["step_images_per_second"] == own["images_per_second"]
    assert result["projection"]["note"] == "train.compile=true but compile=false: projected from the eager step"
    assert "partial" not in result


def test_the_recipes_own_layout_is_measured_when_the_grid_lacks_it(cli, tmp_path):
    # recipe=cpu trains channels_last; without the eager grid only the channels_last row would run.
    out = cli(
        "bench",
        "step",
        "recipe=smoke",
        "train.channels_last=false",
        "steps=1",
        "warmup=0",
        "compile=false",
        "eager=false",
        f"json={tmp_path / 's.json'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "s.json").read_text())
    assert [(r["channels_last"], r["compile_mode"]) for r in result["step"]] == [(True, None), (False, None)]
    # The memory a step needs per image, measured before the grid, and the batch this machine fits.
    assert [r["precision"] for r in result["memory"]] == ["bf16", "no"]
    assert all(0 < r["mib_per_image"] < 5 and r["largest_batch"] > 1000 for r in result["memory"]), result["memory"]
    assert "mib_per_image" in out.stdout and "largest_batch" in out.stdout


def test_compile_modes_are_checked(cli):
    bad = cli("bench", "step", "compile=max-autotune,fastest")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        (
            "error: compile=max-autotune,fastest: 'fastest' is not a mode; expected "
            "true, false or a comma list of default, reduce-overhead, "
            "max-autotune-no-cudagraphs, max-autotune"
        )
    ]
    from cifar100.cli import main

    assert main(["bench", "step", "eager=no"]) == 2


# Guarantees for graph capture (torch.compile as one graph, CUDA graphs), checked on the CPU.


def _accelerator(precision: str = "no"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, mixed_precision=precision)


@pytest.mark.parametrize("name", ["cifarnet_tiny", "seresnet50"])
def test_the_best_recipes_model_traces_as_one_graph(name):
    import torch

    from cifar100.commands.bench import graph_breaks
    from cifar100.config import load_config
    from cifar100.training.models import build_model

    cfg = load_config("best", [f"model.name={name}"])
    model = build_model(cfg.model, 100).to(memory_format=torch.channels_last)
    assert type(model.act1 if name == "seresnet50" else model.stem[1]).__name__ == "Mish"
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    # As training compiles it: prepared by Accelerate for bf16 (its autocast and fp32-output wrappers), under autocast.
    accelerator = _accelerator(cfg.train.precision)
    prepared = accelerator.prepare(model)
    with accelerator.autocast():
        assert graph_breaks(prepared, x) == 0
    broken = torch.nn.Sequential(model, _PrintsMidway())  # the count is real: a print breaks the graph
    assert graph_breaks(broken, x) >= 1


class _PrintsMidway(__import__("torch").nn.Module):
    def forward(self, x):
        x = x * 2
        print("host work inside the model")
        return x + 1


def test_a_compiled_epoch_and_evaluation_compile_one_graph_each_with_no_recompiles():
    """Training steps of one shape, and an evaluation whose last batch is short: a model compiled as
    training compiles it is traced exactly twice (train mode, eval mode), never per shape."""
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    from cifar100.config import load_config
    from cifar100.data.mixing import BatchMixer
    from cifar100.training.engine import Engine, EpochProgress, StepRules
    from cifar100.training.evaluation import EvalSettings, evaluate
    from cifar100.training.models import build_model
    from cifar100.training.optim import Schedule, build_optimizer

    cfg = load_config("best", ["model.name=seresnet50"])
    accelerator = _accelerator()
    torch.manual_seed(0)
    model = build_model(cfg.model, 100).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 100, (4,), generator=gen)) for _ in range(3)]
    mixer = BatchMixer(100, cfg.augment.cutmix.prob, cfg.augment.cutmix.alpha, 0, 0, 0)
    schedule = Schedule(optimizer, cfg.optim, cfg.sched, len(batches), cfg.train.epochs)
    engine = Engine(compiled, optimizer, schedule, mixer, accelerator, StepRules(seed=0, channels_last=True))
    result = engine.train_epoch(1, batches, EpochProgress())
    assert result.images == 12 and counter.frame_count == 1
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 100, (10,))
    settings = EvalSettings(cfg.augment.mean, cfg.augment.std, batch_size=4, channels_last=True)
    padded = evaluate(compiled, images, labels, accelerator, settings)  # 4 + 4 + 2 padded to 4
    assert counter.frame_count == 2 and not counters["graph_break"] and not counters["recompiles"]
    whole = evaluate(model, images, labels, accelerator, dataclasses.replace(settings, batch_size=10))
    assert padded.images == whole.images == 10
    assert padded.loss == pytest.approx(whole.loss, rel=1e-5)
    assert (padded.top1, padded.top5) == (whole.top1, whole.top5)


def test_every_training_batch_has_one_shape_in_both_pipelines():
    import torch

    from cifar100.config import load_config
    from cifar100.data.loader import build_train_loader

    accelerator = _accelerator()
    images = torch.randint(0, 256, (130, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(130) % 100
    for pipeline in ("reference", "device"):
        cfg = load_config("smoke", [f"data.pipeline={pipeline}", "augment.autoaugment=none"])
        loader = build_train_loader(
            images, labels, 50, cfg.data, cfg.augment, seed=cfg.seed, grad_accum=1, accelerator=accelerator
        )
        assert [tuple(x.shape) for x, _ in loader] == [(50, 3, 32, 32)] * 2, pipeline
