"""A run that fits its memory: micro-batches give the whole batch's step, a trial step changes nothing,
and under a real address-space limit (`RLIMIT_AS`, as `ulimit -v` sets) a run either says in one
line how to fit or, with `train.micro_batch=auto`, fits itself and trains the recipe's global batch."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import ROOT, clean_environ, overridden
from torch import nn

from cifar100.config import OptimConfig, SchedConfig, load_config
from cifar100.data.mixing import BatchMixer
from cifar100.errors import UserError
from cifar100.training import memory
from cifar100.training.engine import Engine, EpochProgress, StepRules
from cifar100.training.optim import Schedule, build_optimizer

# The tests make Accelerators (and so Accelerate's process-wide state) themselves.
pytestmark = pytest.mark.usefixtures("accelerate_state")


def test_micro_batch_is_null_auto_or_a_whole_number():
    assert load_config("smoke", []).train.micro_batch is None
    assert load_config("smoke", ["train.micro_batch=auto"]).train.micro_batch == "auto"
    assert load_config("smoke", ["train.micro_batch=16"]).train.micro_batch == 16
    for bad in ("0", "big", "true", "1.5"):
        with pytest.raises(UserError, match=r"train\.micro_batch"):
            load_config("smoke", [f"train.micro_batch={bad}"])


def _step_weights(micro: int | None, accum: int, optimizer_name: str = "sgd") -> list[torch.Tensor]:
    """The weights after one optimizer step over 2 x 10 images (accum micro-steps) of a model with no
    batch-norm, trained `micro` images at a time."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = build_optimizer(model, OptimConfig(name=optimizer_name, lr=0.5))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = Schedule(optimizer, OptimConfig(lr=0.5), SchedConfig(name="none"), 1, 1)
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(20, 3, 4, 4, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    batches = list(zip(images.split(20 // accum), labels.split(20 // accum)))
    rules = StepRules(seed=0, micro_batch=micro)
    engine = Engine(model, optimizer, schedule, BatchMixer(10, 0, 0, 0, 0, 0), accelerator, rules)
    result = engine.train_epoch(1, batches, EpochProgress())
    assert result.images == 20
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("accum", [1, 2])
def test_micro_batches_take_the_whole_batch_step(accum):
    whole = _step_weights(None, accum)
    assert all(torch.equal(a, b) for a, b in zip(whole, _step_weights(20 // accum, accum)))  # one piece: bit for bit
    for micro in (3, 4):  # 3 leaves a smaller last piece, weighted by its share
        pieces = _step_weights(micro, accum)
        assert not all(torch.equal(a, b) for a, b in zip(whole, pieces))  # the sums are rounded otherwise...
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(whole, pieces))  # ...to the same step


def test_a_trial_step_changes_no_weight_statistic_gradient_or_random_state():
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 3, 32, 32))
    optimizer = build_optimizer(model, OptimConfig(name="adam", lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(12, 3, 32, 32), torch.full((12, 10), 0.1))  # two pieces of 8 and 4, then the step
    rng = torch.get_rng_state()
    assert memory.optimizer_state_slots(optimizer) == 2  # Adam's two moments
    assert memory.step_fits(model, optimizer, accelerator, 8, batch, channels_last=True, held=2**20)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state
    assert torch.equal(rng, torch.get_rng_state())
    # With the optimizer's state made (a resume), the trial's step leaves it as it was too.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [t.clone() for s in optimizer.state.values() for t in s.values()]
    assert memory.step_fits(model, optimizer, accelerator, 4, batch, channels_last=False)
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(moments, [t for s in optimizer.state.values() for t in s.values()]))


def test_the_search_finds_the_fewest_pieces_that_fit():
    tried = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= 300

    assert memory.largest_fitting(1600, fits) == 267  # 6 pieces: 5 (320 images) do not fit
    assert tried[:4] == [1600, 800, 400, 200] and len(tried) == len(set(tried)) <= 7  # no size tried twice
    assert memory.largest_fitting(1600, lambda size: True) == 1600
    assert memory.largest_fitting(5, lambda size: False) is None
    tried.clear()
    assert memory.largest_fitting(50, lambda size: fits(size) and size < 2) == 1
    assert len(tried) == len(set(tried)), tried  # 2 failed once: 25 to 49 pieces are not tried again


def test_a_failed_cpu_allocation_is_an_out_of_memory():
    with pytest.raises(RuntimeError) as err:
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte
    assert memory.is_out_of_memory(err.value)
    assert not memory.is_out_of_memory(RuntimeError("shapes cannot be multiplied"))


COPY_TRIALS = """
import os, resource, signal, sys
import torch
from cifar100.training import memory

cpu = torch.device("cpu")
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
limit = status("VmSize:") * 1024 + 2**30  # a GiB above what this process maps
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
torch.set_num_threads(2)
torch.ones(256, 256) @ torch.ones(256, 256)  # the thread pool started, as a run's is before its trials
before = status("VmSize:")
print(memory._fits(lambda: torch.ones(2**27), cpu))  # 512 MiB of float32 ones: fits
print(memory._fits(lambda: torch.ones(2**29), cpu))  # 2 GiB: past the limit
print(memory._fits(lambda: os.kill(os.getpid(), signal.SIGSEGV), cpu))  # the copy crashes
print(status("VmSize:") - before < 64 * 1024, torch.get_num_threads())
try:
    memory._fits(lambda: int("x"), cpu)
except RuntimeError as err:
    print(err)
"""


def test_a_cpu_trial_runs_in_a_copy_of_the_process_that_leaves_nothing_behind():
    # Under a real address-space limit, with a two-thread pool already running (GNU OpenMP's pool hangs
    # a forked copy that uses it): a size that fits, one that does not, a copy that crashes, and an
    # error that is not about memory; the process's own mappings and threads are as they were.
    out = subprocess.run(
        [sys.executable, "-c", COPY_TRIALS], cwd=ROOT, env=clean_environ(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[:4] == ["True", "False", "False", "True 2"], out.stdout + out.stderr[-2000:]
    assert lines[4] == "a micro-batch trial failed: ValueError: invalid literal for int() with base 10: 'x'"


def test_the_evaluation_batch_halves_until_it_fits():
    assert memory.largest_halving(1024, lambda size: size <= 100) == 64
    assert memory.largest_halving(3, lambda size: False) is None
    AcceleratorState._reset_state(True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert memory.eval_fits(model, Accelerator(cpu=True), 8, channels_last=False, flip=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


@pytest.mark.slow
def test_a_micro_batch_of_the_whole_batch_trains_bit_for_bit_as_without(tmp_path, real_data):
    common = ["recipe=smoke", f"data.root={real_data}", f"log.dir={tmp_path}", "train.epochs=1"]
    for name, micro in (("plain", "null"), ("whole", "50")):
        out = _run([*common, f"name={name}", f"train.micro_batch={micro}"])
        assert out.returncode == 0, out.stderr[-3000:]
    assert _scores(tmp_path / "plain") == _scores(tmp_path / "whole")


# A step of cifarnet_tiny maps about 0.45 MiB of address space per image in fp32 here: 1600 images about
# 0.7 GiB beyond what the process has mapped before it trains, and the run maps about 0.25 GiB more
# after its first step (plots, checkpoint writer). A limit 0.25 GiB below the unlimited run's peak
# stops the whole batch's first step, and leaves room for a trial of a few hundred images with its
# 384 MiB headroom, on one process and on each of two (which map about 0.2 GiB more each).
HUNGRY = (
    "recipe=smoke",
    "data.pipeline=device",
    "augment.autoaugment=none",
    "data.batch_size=1600",
    "data.train_limit=1600",
    "data.test_limit=100",
    "data.eval_batch_size=100",
)
BELOW_PEAK = int(0.25 * 2**30)
PEAK = "import atexit, runpy, sys; atexit.register(lambda: print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0], file=sys.stderr)); sys.argv = sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')"  # noqa: E501


def _run(args: list[str], limit: int | None = None, launcher: tuple[str, ...] = ("train.py",)):
    def limited() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**clean_environ(), "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=limited
    )


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SCORES = ("lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5")  # not the timings


def _scores(run_dir):
    return [[row[k] for k in SCORES] for row in _rows(run_dir)]


@pytest.fixture(scope="module")
def unlimited(tmp_path_factory, real_data):
    """The hungry run without a limit, and the address-space limit derived from its peak."""
    logs = tmp_path_factory.mktemp("unlimited")
    out = _run([*HUNGRY, f"data.root={real_data}", f"log.dir={logs}", "name=free"], launcher=("-c", PEAK, "train.py"))
    assert out.returncode == 0, out.stderr[-3000:]
    peak = int(out.stderr.rsplit("VmPeak:", 1)[1].split()[0]) * 1024
    return logs / "free", peak - BELOW_PEAK


@pytest.mark.slow
def test_under_a_memory_limit_the_batch_that_does_not_fit_is_one_line(tmp_path, real_data, unlimited):
    _, limit = unlimited
    out = _run([*HUNGRY, f"data.root={real_data}", f"log.dir={tmp_path}"], limit)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr
    # The limit sits 0.25 GiB under the free run's peak; where the peak falls moves by a few MB from run
    # to run, so the first step may still fit and the second run out (one suite run in many saw that),
    # or epoch 1's checkpoint find no room to start its writer's thread (seen once).
    said = "error: out of memory in the training step (epoch {}, batch 0) with 1600 images per process"
    first, second = line.startswith(said.format(1)), line.startswith(said.format(2))
    writer = line.startswith("error: out of memory while checkpointing at epoch ")
    assert first or second or writer, line
    assert "address space limited by ulimit -v" in line
    last_good = "none yet" if first or writer else str(tmp_path / "smoke" / "checkpoints" / "step-00000001")
    assert f"Last good checkpoint: {last_good}" in line
    if not writer:  # a step's line says how to fit the batch
        assert "train.grad_accum=2" in line and "train.micro_batch=auto" in line


@pytest.mark.slow
def test_under_the_limit_auto_trains_the_recipes_global_batch(tmp_path, real_data, unlimited):
    reference, limit = unlimited
    out = _run([*HUNGRY, f"data.root={real_data}", f"log.dir={tmp_path}", "name=auto", "train.micro_batch=auto"], limit)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    free_summary = json.loads((reference / "summary.json").read_text())
    micro = summary["micro_batch"]
    assert 1 <= micro < 1600 and free_summary["micro_batch"] == 1600
    assert f"train.micro_batch=auto: {micro} images per forward and backward" in out.stdout
    # The same optimizer steps: the same images per rank and the same rate at each epoch...
    assert summary["images_per_rank"] == free_summary["images_per_rank"] == [3200]
    rows, free_rows = _rows(tmp_path / "auto"), _rows(reference)
    assert [r["lr"] for r in rows] == [r["lr"] for r in free_rows]
    # ...and the same training, but for batch-norm statistics taken over micro-batches.
    for row, free in zip(rows, free_rows):
        assert row["train_loss"] == pytest.approx(free["train_loss"], rel=0.02)
        assert row["test_loss"] == pytest.approx(free["test_loss"], rel=0.02)
    # A resume keeps the size its run found (without the limit a search would find 1600), and so
    # trains epoch 2 again to the same numbers.
    first = tmp_path / "auto" / "checkpoints" / "step-00000001"
    again = _run(
        [
            *HUNGRY,
            f"data.root={real_data}",
            f"log.dir={tmp_path}",
            "name=auto",
            "train.micro_batch=auto",
            f"resume={first}",
        ]
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"train.micro_batch=auto: {micro} images per forward and backward (kept from the run resumed)" in again.stdout
    )
    assert _scores(tmp_path / "auto") == [[r[k] for k in SCORES] for r in rows]


@pytest.mark.slow
def test_two_processes_under_the_limit_agree_on_one_size(tmp_path, real_data, unlimited):
    _, limit = unlimited
    args = overridden(
        list(HUNGRY),
        [
            "data.batch_size=3200",  # 1600 images per process, as in the one-process run
            "data.train_limit=3200",
            "train.epochs=1",
            f"data.root={real_data}",
            f"log.dir={tmp_path}",
            "name=ddp",
            "train.micro_batch=auto",
        ],
    )
    # A DDP process maps more than the one-process run (the process group, gloo's buffers and threads): at
    # the same limit its one-image step once failed to fit. Half of BELOW_PEAK more keeps the limit under
    # the one-process peak, so the full batch still cannot fit.
    out = _run(
        args, limit + BELOW_PEAK // 2, launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py")
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images_per_rank"] == [1600, 1600]
    assert 1 <= summary["micro_batch"] < 1600
    assert f"{summary['micro_batch']} images per forward and backward" in out.stdout


def test_the_advice_never_names_what_the_run_already_set():
    assert "auto" not in memory.fix_for_train(512, 64, 1, "auto")  # auto chose 64 and it did not hold
    assert "train.micro_batch=32" in memory.fix_for_train(512, 64, 1, "auto")
    assert "train.micro_batch=32 (or auto" in memory.fix_for_train(512, 64, 1, 64)
    assert "train.grad_accum=2 or train.micro_batch=auto" in memory.fix_for_train(512, None, 1)
    assert "micro_batch" not in memory.fix_for_eval(200, auto=True) and "eval_batch_size=100" in memory.fix_for_eval(
        200, True
    )
    assert "train.micro_batch=auto" in memory.fix_for_eval(200)


@pytest.mark.slow
@pytest.mark.parametrize("micro", ["null", "auto"])
def test_a_model_too_large_for_the_limit_is_one_line_wherever_it_runs_out(tmp_path, real_data, unlimited, micro):
    """wide_resnet101_2 (125 M parameters) under the limit: out of memory while building it, fitting
    its micro-batch or training is one line naming the last good checkpoint, never a traceback (a
    4-4.6 GB limit ended in one)."""
    _, limit = unlimited
    args = ["recipe=smoke", "model.name=wide_resnet101_2", "data.batch_size=50", "data.train_limit=100"]
    out = _run([*args, f"data.root={real_data}", f"log.dir={tmp_path}", f"train.micro_batch={micro}"], limit)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert out.stderr.count("\n") == 1 and "address space limited by ulimit -v" in line, out.stderr[-3000:]
    if line.startswith("error: out of memory"):
        assert "Last good checkpoint: none yet" in line and "model.name" in line
    else:  # auto's trials found that not even one image's step fits
        assert line.startswith("error: train.micro_batch=auto: not even one image's training step fits"), line


# An evaluation under a real address-space limit, in a process of its own: a wide convolution whose
# activations take 2 MiB an image (256 channels of 32 x 32, before and after the activation), so 4096
# images at once need about 8 GiB and 512 need 1 GiB. The limit leaves 1.5 GiB above what the process
# has mapped once the model and the images exist.
EVAL_UNDER_LIMIT = """
import json, resource, sys, torch
from accelerate import Accelerator
from torch import nn
from cifar100.training.evaluation import EvalSettings, evaluate
torch.manual_seed(0)
layers = [nn.Conv2d(3, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 100)]
model = nn.Sequential(*layers)
images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
labels = torch.randint(0, 100, (4096,))
acc = Accelerator(cpu=True)
settings = EvalSettings((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), batch_size=4096, tta_flip=True)
exact = evaluate(model, images, labels, acc, EvalSettings((0.5,) * 3, (0.25,) * 3, batch_size=64, tta_flip=True))
mapped = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
limit = mapped + int(float(sys.argv[1]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    got = evaluate(model, images, labels, acc, settings, smaller_on_oom=sys.argv[2] == "auto")
except MemoryError as err:
    print(json.dumps({"error": f"MemoryError: {err}"}))
except RuntimeError as err:
    print(json.dumps({"error": str(err).splitlines()[0]}))
else:
    print(json.dumps({"batch": got.batch_size, "scores": [got.loss, got.top1, got.top5],
                      "exact": [exact.loss, exact.top1, exact.top5], "training": model.training}))
"""


def _evaluate_under_limit(gib: float, mode: str) -> dict:
    env = {**clean_environ(), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", EVAL_UNDER_LIMIT, str(gib), mode], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["auto", "fixed"])
def test_an_evaluation_that_runs_out_of_memory_halves_its_batch_under_auto(mode):
    """Under train.micro_batch=auto a real evaluation that runs out of memory (here 4096 images under a
    1.5 GiB margin) is run again at half the batch until it fits, and scores exactly what a small batch
    scores; without auto the out-of-memory error reaches the caller (the trainer's one line)."""
    result = _evaluate_under_limit(1.5, mode)
    if mode == "auto":
        assert 1 <= result["batch"] <= 1024 and result["training"], result
        assert result["scores"] == pytest.approx(result["exact"], rel=1e-6), result  # summed in another order
    else:
        assert set(result) == {"error"}, result
        assert memory.is_out_of_memory(RuntimeError(result["error"])) or result["error"].startswith("MemoryError")


def test_an_evaluation_that_does_not_fit_one_image_says_so():
    result = _evaluate_under_limit(0.0, "auto")
    assert result == {"error": "MemoryError: not even one image's evaluation fits"}, result
