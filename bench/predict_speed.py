"""Prediction throughput of one model three ways, side by side in one process: PyTorch eager (as
`cifar100 predict run=` runs it: fp32, the recipe's memory format), the `torch.export` program and
ONNX Runtime (as `predict model=` runs them), each at batch 1 and batch 256, on the CPU.

Usage: python bench/predict_speed.py DATA_ROOT [RECIPE ...] (default: cpu best). The models are
freshly initialised (speed does not depend on the weights) and exported with `cifar100 export`'s
own code, checks included. Each cell runs one warm-up call, then calls for at least SECONDS s
and at least 3 calls; the three runtimes take turns per batch size, so a change in the machine's
load reaches all three. Also timed: reading and resizing image files (`images.read_image`), which
`predict` does before the model sees a batch. Prints a Markdown table and the load average.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from PIL import Image

from cifar100.commands import export, images
from cifar100.config import load_config
from cifar100.data import cifar as cifar_data
from cifar100.data.reference import normalize_batch
from cifar100.training.models import build_model
from cifar100.training.runtime import usable_cores

SECONDS = 3.0
BATCHES = (1, 256)


def rate(call: Callable[[], object], batch: int) -> float:
    """Images per second of `call` on a batch of `batch` images."""
    call()
    calls, began = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - began < SECONDS:
        call()
        calls += 1
    return batch * calls / (time.perf_counter() - began)


def runtimes(recipe: str, dataset: cifar_data.Cifar100, folder: Path, threads: int) -> dict[str, Callable]:
    """name -> (batch of normalised images -> logits) for eager, .pt2 and ONNX Runtime."""
    cfg = load_config(recipe, [])
    model = build_model(cfg.model, cifar_data.NUM_CLASSES).eval()
    export.export_model(model, export.FORMATS, folder, recipe, export.check_batches(dataset, cfg.augment), {})
    eager = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
    program = export.load_program(folder / f"{recipe}.pt2")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(folder / f"{recipe}.onnx"), options, providers=["CPUExecutionProvider"])

    def run_eager(x: torch.Tensor) -> object:
        with torch.no_grad():
            return eager(x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x)

    def run_program(x: torch.Tensor) -> object:
        with torch.no_grad():
            return program(x)

    def run_onnx(x: torch.Tensor) -> object:
        return session.run(None, {export.INPUT: x.numpy()})

    return {"PyTorch eager": run_eager, "torch.export .pt2": run_program, "ONNX Runtime": run_onnx}


def decode_rates(folder: Path) -> dict[str, float]:
    """Files per second `images.read_image` reads into 32 x 32: a CIFAR-sized PNG and a 640 x 480 JPEG."""
    rng = np.random.default_rng(0)
    files = {
        "32 x 32 PNG": (folder / "small.png", (32, 32)),
        "640 x 480 JPEG": (folder / "photo.jpg", (480, 640)),
    }
    for path, (h, w) in files.values():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return {name: rate(lambda p=path: images.read_image(p), 1) for name, (path, _) in files.items()}


def main(root: str, recipes: list[str]) -> None:
    threads = usable_cores()
    torch.set_num_threads(threads)
    dataset = cifar_data.load(root)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            cfg = load_config(recipe, [])
            ways = runtimes(recipe, dataset, Path(tmp), threads)
            for batch in BATCHES:
                index = torch.arange(batch) % len(dataset.test.labels)
                x = normalize_batch(dataset.test.images[index], cfg.augment.mean, cfg.augment.std)
                cells = {label: rate(lambda f=f, x=x: f(x), batch) for label, f in ways.items()}
                rows.append((f"`{recipe}` ({cfg.model.name})", batch, cells))
        decoding = decode_rates(Path(tmp))
    load_after = os.getloadavg()
    labels = list(rows[0][2])
    print(f"| recipe (model) | batch | {' | '.join(labels)} |")
    print("|---|---|" + "---|" * len(labels))
    for recipe, batch, cells in rows:
        print(f"| {recipe} | {batch} | " + " | ".join(f"{cells[label]:,.0f}" for label in labels) + " |")
    print()
    print(
        "reading files into 32 x 32 (images/s, one thread): " + ", ".join(f"{k} {v:,.0f}" for k, v in decoding.items())
    )
    print(
        f"threads: {threads} (torch and ONNX Runtime); torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["cpu", "best"])
