"""`cifar100 bench step|data|recipe`: measured speed of each stage, side by side in one process.

- step: training images/s of a recipe's model on synthetic data for precision x channels_last x
  compile choices, plus the same work through a plain PyTorch loop and through this project's
  engine, with model FLOP utilisation against a matrix product measured on the same device.
- data: images/s of the per-sample reference input path (N workers) and of the batched device path.
- recipe: the projected epoch and whole-run time from the slower of the two.
- checkpoint: how long one checkpoint of the recipe's model holds training up, written in the
  foreground or copied to host memory and written by the background writer (as training does).
Every figure comes from timing real work here; nothing is looked up.
"""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from cifar100.config import Config
from cifar100.data.cifar import NUM_CLASSES
from cifar100.data.loader import build_train_loader, epoch_batches
from cifar100.data.mixing import soft_target_cross_entropy
from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import BackgroundWriter, host_copy, save_checkpoint
from cifar100.training.engine import EpochProgress
from cifar100.training.memory import memory_limit
from cifar100.training.models import build_model, flops_per_image
from cifar100.training.runtime import make_accelerator, release_accelerate
from cifar100.training.step_parts import build_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large matrix product: the ceiling MFU is quoted against."""
    n = 8192 if device.type == "cuda" else 2048
    # fp32 convolutions run on TF32 tensor cores by default (cudnn.allow_tf32), so the fp32
    # ceiling is a TF32 product too; otherwise fp32 "MFU" exceeds 100 %.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _synthetic(batch: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    return images, labels


def _dataset_like() -> torch.Tensor:
    """Images as the dataset holds them (uint8, N x 3 x 32 x 32), for a whitened stem to start from."""
    return torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def step_runner(
    cfg: Config, precision: str, channels_last: bool, compile_mode: str | None, loop: str, cudnn_benchmark: bool = True
):
    """A function `run(n)` that trains n steps of the recipe's step (built as a run builds it) on one
    synthetic batch, the step's parts, the input batch and the device; `loop` is "plain" (bare
    PyTorch over the same model, optimizer and mixer) or "engine" (the run's own step)."""
    release_accelerate()  # each variant gets its own precision
    torch.backends.cudnn.benchmark = cudnn_benchmark
    variant = replace(
        cfg,
        data=replace(cfg.data, sizes=()),  # one size: the plain loop does not resize
        sched=replace(cfg.sched, warmup_epochs=0),
        train=replace(cfg.train, channels_last=channels_last, compile=compile_mode is not None, precision=precision),
        log=replace(cfg.log, progress=False),
    )
    accelerator = make_accelerator(variant, precision)
    device = accelerator.device
    images, labels = _synthetic(cfg.data.batch_size, device)
    mode = None if compile_mode in (None, "default") else compile_mode
    parts = build_step(variant, accelerator, _dataset_like(), steps_per_epoch=10**9, compile_mode=mode)
    model, optimizer, mixer = parts.model, parts.optimizer, parts.mixer
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def plain(n: int) -> None:
        for step in range(n):
            x, t = mixer(images, labels, np.random.default_rng(step))
            with accelerator.autocast():
                loss = soft_target_cross_entropy(model(x).float(), t)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def engine(n: int) -> None:
        parts.engine.train_epoch(1, [(images, labels)] * n, EpochProgress())

    return (plain if loop == "plain" else engine), parts, images, device, accelerator.autocast


def step_rate(
    cfg: Config,
    precision: str,
    channels_last: bool,
    compile_mode: str | None,
    loop: str,
    steps: int,
    warmup: int,
    cudnn_benchmark: bool = True,
    profile_path: str | None = None,
) -> tuple[float, float | None, int | None, list[dict] | None]:
    """Training images/s for one choice, host waits per step, graph breaks of the compiled model
    (None when eager) and, with `profile_path`, the top kernels of a profile of a few more steps."""
    run, parts, images, device, autocast = step_runner(
        cfg, precision, channels_last, compile_mode, loop, cudnn_benchmark
    )
    if warmup:
        run(warmup)
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    rate = steps * cfg.data.batch_size / (time.perf_counter() - start)
    waits = host_waits_per_step(run, device)
    kernels = profile_steps(run, device, min(steps, 5), profile_path) if profile_path else None
    with autocast():
        breaks = graph_breaks(parts.prepared, images) if compile_mode else None
    return rate, waits, breaks, kernels


def graph_breaks(model: torch.nn.Module, images: torch.Tensor) -> int:
    """How many times TorchDynamo breaks the model's forward pass into separate graphs (0: one graph,
    what CUDA graphs and whole-graph fusion need); traced in training mode, as the step runs."""
    import torch._dynamo

    torch._dynamo.reset()  # explain must trace afresh, not reuse the compiled frames
    return torch._dynamo.explain(model)(images).graph_break_count


def profile_steps(run, device: torch.device, steps: int, path: str, top: int = 15) -> list[dict]:
    """Profile `steps` more steps (already compiled and warm): print the `top` kernels by self time
    (CUDA kernels on a GPU, operators on a CPU), save the trace as gzipped Chrome JSON at `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        run(steps)
        _sync(device)
    events = [
        e
        for e in prof.key_averages()
        if (e.device_type.name == "CUDA") == cuda and (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0
    ]
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events)
    rows = [
        {
            "kernel": e.key[:90],
            "calls_per_step": e.count / steps,
            "ms_per_step": key(e) / 1e3 / steps,
            "share": key(e) / total,
        }
        for e in sorted(events, key=key, reverse=True)[:top]
    ]
    trace = Path(path)
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace.with_suffix("")))
    with open(trace.with_suffix(""), "rb") as raw, gzip.open(trace, "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.with_suffix("").unlink()
    print(
        f"top {len(rows)} {'CUDA kernels' if cuda else 'CPU operators'} by self time over {steps} steps "
        f"({total / 1e3 / steps:.2f} ms per step in all); trace {trace}"
    )
    print_table(rows)
    return rows


def host_waits_per_step(run, device: torch.device, steps: int = 4) -> float | None:
    """How often per step the host waits for the GPU, as torch's CUDA sync debug mode counts them;
    None off CUDA. Runs of `steps` and `2 * steps` are counted and differenced, so the waits an
    epoch has once (reading its metrics at the end) cancel out."""
    if device.type != "cuda":
        return None

    def count(n: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(n)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    return (count(2 * steps) - count(steps)) / steps


def _peak_bytes(device: torch.device) -> Callable[[], int]:
    """Start measuring this process's peak memory on `device`; the returned function reads the peak:
    CUDA's peak allocation, or on a CPU the peak resident set (VmHWM, reset through clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: torch.cuda.max_memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set starts again from now
    status = Path("/proc/self/status")
    return lambda: 1024 * int(next(line for line in status.read_text().splitlines() if "VmHWM" in line).split()[1])


def step_memory(cfg: Config, precision: str, sizes: tuple[int, int] = (16, 64)) -> dict:
    """The memory one training forward and backward of the recipe's model needs per image, from its
    peak at two batch sizes (what does not grow with the batch cancels out), and the largest batch
    that fits this device's memory at that rate beside what the step holds at any batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model, NUM_CLASSES).to(device, memory_format=memory_format).train()  # type: ignore[call-overload]
    dtype = _DTYPES[precision]

    def step(n: int) -> None:
        images, labels = _synthetic(n, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(images.contiguous(memory_format=memory_format)), labels)
        loss.backward()

    step(sizes[0])  # first-step allocations (the gradients, the kernels' caches) belong to every batch
    peaks = []
    for n in sizes:
        peak = _peak_bytes(device)
        step(n)
        _sync(device)
        peaks.append(peak())
    per_image = max(peaks[1] - peaks[0], 1) / (sizes[1] - sizes[0])
    fixed = peaks[0] - sizes[0] * per_image
    limit, what = memory_limit(device)
    if what.startswith("address space"):  # the limit counts what is mapped and not resident too (libraries)
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        fixed += 1024 * (int(status["VmSize"].split()[0]) - int(status["VmRSS"].split()[0]))
    batch, kind = cfg.data.batch_size, "CUDA allocated" if device.type == "cuda" else "resident set"
    return {
        "model": cfg.model.name,
        "precision": precision,
        "mib_per_image": per_image / 2**20,
        "fixed_gib": fixed / 2**30,
        f"batch_{batch}_gib": (fixed + batch * per_image) / 2**30,
        "device_gib": limit / 2**30,
        "largest_batch": max(0, int((limit - fixed) / per_image)),
        "measured_at": f"peak at batch {sizes[0]} and {sizes[1]} ({kind}); device: {what}",
    }


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


_Choice = tuple[str, bool, str | None, str, bool]  # (precision, channels_last, compile mode, loop, autotune)


def bench_step(
    cfg: Config,
    steps: int,
    warmup: int,
    compile_modes: tuple[str, ...] = ("default",),
    eager_grid: bool = True,
    profile_path: str | None = None,
    on_row=lambda rows: None,
) -> list[dict]:
    """The step grid on this device: each precision with and without channels_last through our engine,
    then, at the first precision with channels_last, a plain PyTorch loop, (on CUDA) cuDNN's
    heuristics instead of its autotuner (training autotunes), and the model compiled in each of
    `compile_modes`. Without `eager_grid`, only the eager row the compiled ones compare with. The
    recipe's own choice is always measured, so a projection has its row. `profile_path`: profile
    the first compiled row (or the eager one) there. `on_row(rows)` after each row: a caller can
    save what was measured before a later variant fails or runs out of time."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    grid = _grid(cfg, cuda, compile_modes, eager_grid)
    profiled = next((g for g in grid if g[2]), grid[0]) if profile_path else None
    flops = flops_per_image(build_model(cfg.model, NUM_CLASSES))
    peaks = {p: matmul_peak(device, _DTYPES[p]) for p in {g[0] for g in grid}}
    rows = []
    for choice in grid:
        precision, channels_last, mode, loop, autotune = choice
        rate, waits, breaks, kernels = step_rate(
            cfg,
            precision,
            channels_last,
            mode,
            loop,
            steps,
            warmup,
            autotune,
            profile_path if choice == profiled else None,
        )
        measured = {"host_waits_per_step": waits, "graph_breaks": breaks}
        rows.append({**_grid_row(cfg, choice, rate, flops, peaks[precision]), **measured})
        if kernels is not None:
            rows[-1]["top_kernels"] = kernels
        on_row(rows)
    return rows


def _grid(cfg: Config, cuda: bool, compile_modes: tuple[str, ...], eager_grid: bool) -> list[_Choice]:
    """bench_step's variants in the order they run, the recipe's own choice among them."""
    precisions = ["bf16", "no"] if cuda else ["no"]
    first = precisions[0]
    grid: list[_Choice] = [(first, True, None, "engine", True)]
    if eager_grid:
        grid = [(p, cl, None, "engine", True) for p in precisions for cl in (True, False)]
        grid += [(first, True, None, "plain", True)] + [(first, True, None, "engine", False)] * cuda
    grid += [(first, True, mode, "engine", True) for mode in compile_modes]
    own = _own_choice(cfg, cuda, compile_modes)
    if own not in grid:
        grid.append(own)
    return grid


def _grid_row(cfg: Config, choice: _Choice, rate: float, flops: float, peak: float) -> dict:
    """One variant's row up to its MFU: `rate` images/s of `flops` per image's forward, against `peak` FLOP/s."""
    precision, channels_last, mode, loop, autotune = choice
    achieved = rate * 3 * flops  # forward + backward ~ 3x the forward FLOPs
    return {
        "model": cfg.model.name,
        "batch": cfg.data.batch_size,
        "precision": precision,
        "channels_last": channels_last,
        "compile": mode is not None,
        "compile_mode": mode,
        "loop": loop,
        "cudnn_benchmark": autotune if torch.cuda.is_available() else None,
        "images_per_second": rate,
        "tflops": achieved / 1e12,
        "mfu": achieved / peak,
        "matmul_peak_tflops": peak / 1e12,
    }


def compile_modes(text: str | None) -> tuple[str, ...]:
    """`compile=` as typed: true (or nothing) is torch.compile's default mode, false none, else a
    comma list of modes."""
    if text in (None, "true"):
        return ("default",)
    if text == "false":
        return ()
    modes = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown:
        raise UserError(
            f"compile={text}: {unknown[0]!r} is not a mode; expected true, false or a comma list of "
            f"{', '.join(COMPILE_MODES)}"
        )
    return modes


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def _own_choice(cfg: Config, cuda: bool, compile_modes: tuple[str, ...]) -> _Choice:
    """The grid entry of what training with this recipe runs (fp32 off CUDA, as training falls back;
    compiled in the default mode as training compiles, unless compiling was switched off here)."""
    compiled = "default" if cfg.train.compile and compile_modes else None
    return (cfg.train.precision if cuda else "no", cfg.train.channels_last, compiled, "engine", True)


def bench_data(cfg: Config, dataset, batches: int) -> list[dict]:
    """Images/s of the reference path (per-sample torchvision, `data.workers`) and the device path."""
    release_accelerate()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    images, labels = dataset.train.images, dataset.train.labels
    rows: list[dict[str, Any]] = []
    for pipeline in ("reference", "device"):
        trial = replace(cfg, data=replace(cfg.data, pipeline=pipeline))
        try:
            loader = build_train_loader(
                images,
                labels,
                cfg.data.batch_size,
                trial.data,
                cfg.augment,
                seed=cfg.seed,
                grad_accum=1,
                accelerator=accelerator,
            )
        except Exception as err:
            rows.append({"pipeline": pipeline, "images_per_second": None, "note": str(err)})
            continue
        # From the iterator's creation: timing after the first batch would count batches the
        # workers prefetched before the clock started (and a first epoch pays their start-up).
        _sync(accelerator.device)
        start, n = time.perf_counter(), 0
        for x, _ in itertools.islice(epoch_batches(loader, 1, 0, accelerator), batches):
            n += x.shape[0]
        _sync(accelerator.device)
        rows.append(
            {
                "pipeline": pipeline,
                "workers": cfg.data.workers if pipeline == "reference" else 0,
                "images_per_second": n / (time.perf_counter() - start),
                "note": "",
            }
        )
    return rows


def bench_checkpoint(cfg: Config, reps: int = 3) -> list[dict]:
    """Seconds one checkpoint (weights and optimizer state) stops training, and until it is on disk,
    in a scratch folder under `log.dir` (the disk the runs write to); medians of `reps`."""
    release_accelerate()
    accelerator = make_accelerator(cfg, "no")
    parts = build_step(replace(cfg, train=replace(cfg.train, compile=False)), accelerator, _dataset_like(), 1)
    model, optimizer, device = parts.prepared, parts.optimizer, accelerator.device
    for param in model.parameters():  # one step, so the optimizer holds its momentum / moments
        param.grad = torch.zeros_like(param)
    optimizer.step()
    Path(cfg.log.dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".bench-checkpoint-", dir=cfg.log.dir))
    writer, rows = BackgroundWriter(), []
    try:
        for mode in ("foreground", "background"):
            waits, totals = [], []
            for rep in range(reps):
                _sync(device)
                start = time.perf_counter()
                weights, state = model.state_dict(), {"optimizer": optimizer.state_dict()}
                if mode == "foreground":
                    save_checkpoint(folder, f"{mode}-{rep}", weights, state, {})
                else:
                    writer.submit(
                        partial(save_checkpoint, folder, f"{mode}-{rep}", host_copy(weights), host_copy(state), {})
                    )
                waits.append(time.perf_counter() - start)
                writer.wait()
                totals.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in (folder / f"{mode}-0").iterdir())
            rows.append(
                {
                    "model": cfg.model.name,
                    "megabytes": size / 1e6,
                    "write": mode,
                    "training_waits_s": statistics.median(waits),
                    "on_disk_after_s": statistics.median(totals),
                }
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def project(cfg: Config, step_rows: list[dict], data_rows: list[dict], train_images: int) -> dict:
    """Epoch and whole-run time from the measured rates of this recipe's own choices."""
    want_compile = cfg.train.compile and any(r["compile"] for r in step_rows)
    mine = [
        r
        for r in step_rows
        if r["loop"] == "engine"
        and r["channels_last"] == cfg.train.channels_last
        and r["compile_mode"] == ("default" if want_compile else None)
        and r["cudnn_benchmark"] is not False
    ]  # training autotunes
    step = max(mine, key=lambda r: r["precision"] == cfg.train.precision)["images_per_second"]
    data = next(r["images_per_second"] for r in data_rows if r["pipeline"] == cfg.data.pipeline)
    rate = min(step, data)
    epoch = train_images / rate
    note = (
        "train.compile=true but compile=false: projected from the eager step"
        if cfg.train.compile and not want_compile
        else ""
    )
    return {
        "recipe": cfg.recipe,
        "step_images_per_second": step,
        "data_images_per_second": data,
        "bound_by": "data" if data < step else "model",
        "epoch_seconds": epoch,
        "run_seconds": epoch * cfg.train.epochs,
        "epochs": cfg.train.epochs,
        "note": note,
    }


def print_table(rows: list[dict]) -> None:
    """A small aligned table of the rows' values."""
    if not rows:
        return
    keys = [k for k, v in rows[0].items() if not isinstance(v, list | dict)]
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def write_json(path: str | None, data) -> None:
    """Save the measurements when `json=PATH` was given."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def main(
    action: str,
    cfg: Config,
    *,
    steps: int,
    warmup: int,
    batches: int,
    json_path: str | None,
    compile_modes: tuple[str, ...] = ("default",),
    eager_grid: bool = True,
    profile_path: str | None = None,
) -> None:
    """Run one bench action, print its table and optionally save it as JSON (the step rows also
    after each row, marked partial, so a variant that fails or is stopped loses no earlier row)."""
    from cifar100.data import cifar as cifar_data

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}")
    result: dict = {"device": device}
    if action == "step":  # first: on a CPU, a peak of the grid's larger steps would hide these
        result["memory"] = [step_memory(cfg, precision) for precision in ("bf16", "no")]
        print_table(result["memory"])
    if action in ("step", "recipe"):
        result["step"] = bench_step(
            cfg,
            steps,
            warmup,
            compile_modes,
            eager_grid,
            profile_path,
            on_row=lambda rows: write_json(json_path, {**result, "step": rows, "partial": True}),
        )
        print_table(result["step"])
    if action in ("data", "recipe"):
        dataset = cifar_data.load(cfg.data.root, cfg.data.download)
        result["data"] = bench_data(cfg, dataset, batches)
        print_table(result["data"])
    if action == "checkpoint":
        result["checkpoint"] = bench_checkpoint(cfg)
        print_table(result["checkpoint"])
    if action == "recipe":
        train_images = dataset.train.labels.numel() - cfg.data.val_size
        result["projection"] = project(cfg, result["step"], result["data"], cfg.data.train_limit or train_images)
        print_table([result["projection"]])
    write_json(json_path, result)
