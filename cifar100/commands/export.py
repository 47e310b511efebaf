"""`cifar100 export`: a trained model as an ONNX file and a `torch.export` program, each checked
against the PyTorch model before it is declared written, and the JSON a caller needs beside them.

Both are exported from a fresh fp32 copy of the model in eval mode, on the CPU and in the default
memory format, so neither bf16 nor channels_last training reaches the files. The batch dimension is
dynamic (traced on an example of several images: one would freeze it at 1). The check runs the
file's bytes as predict runs a file it is given (onnxruntime's CPU session; the `.pt2` through
`model_files`' checks, then `torch.export.load(...).module()`) on real test images at batch sizes
`CHECK_BATCHES` and asks for every logit within `RELATIVE_TOLERANCE` of the largest |logit| of
PyTorch's and for the same top-1 class on every image. The `.pt2` holds no pickled record: its
weights are raw tensor records and it keeps no example inputs. The files are made in memory and
written (under temporary names, renamed into place) only when every check passed; a failed one
leaves nothing. `out=` may not lie inside a run folder other than the run's own `export/`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import json
import os
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar100.commands import images, model_files
from cifar100.commands.trained import load_trained
from cifar100.data import cifar as cifar_data
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError
from cifar100.runfolder.safe_files import check_writable, make_folders, refuse_run_folder, write_all_atomic

FORMATS = ("onnx", "pt2")
CHECK_BATCHES = (1, 2, 37)  # one, two and an odd number of real test images, each batch its own
EXAMPLE_BATCH = 4  # traced with this many images: the batch dimension stays dynamic
RELATIVE_TOLERANCE = 1e-4  # of the largest |logit| the PyTorch model gives on the check images
OPSET = 18  # the first with Mish as an ONNX operator
INPUT, OUTPUT = "images", "logits"
SIDECAR_VERSION = 1
Runner = Callable[[torch.Tensor], torch.Tensor]


def run_export(run: str | None, checkpoint: str, which: str, fmt: str, out: str | None, overrides: list[str]) -> Path:
    """Export a run's checkpoint in `fmt` (onnx, pt2 or all) into `out` (default <run>/export);
    returns the sidecar JSON's path."""
    if fmt not in (*FORMATS, "all"):
        raise UserError(f"format={fmt}: expected onnx, pt2 or all")
    formats = FORMATS if fmt == "all" else (fmt,)
    if "onnx" in formats:
        model_files.require_onnx()
    trained = load_trained(run, checkpoint, overrides, which)
    cfg = trained.cfg
    dataset = cifar_data.load(cfg.data.root, cfg.data.download)
    test_top1 = trained.trained_test_top1()
    tested = len(cifar_data.select_splits(dataset, cfg.data, cfg.seed).test)
    sidecar = {
        "version": SIDECAR_VERSION,
        "input_name": INPUT,
        "input_size": [3, images.SIZE, images.SIZE],
        "layout": "NCHW, batch dimension dynamic",
        "dtype": "float32",
        "channel_order": "RGB",
        "normalize": "x = (pixel / 255 - mean) / std, per channel",
        "mean": list(cfg.augment.mean),
        "std": list(cfg.augment.std),
        "resize": images.RESIZE,
        "output_name": OUTPUT,
        "output": "logits (B, 100): softmax gives the class probabilities",
        "tta": cfg.eval.tta,
        "classes": list(dataset.classes),
        "superclasses": list(dataset.superclasses),
        "fine_to_coarse": cifar_data.fine_to_coarse(dataset).tolist(),
        "model": dataclasses.asdict(cfg.model),
        "checkpoint": str(trained.checkpoint.resolve()),
        "checkpoint_tag": trained.tag,
        "epoch": trained.meta.get("epoch"),
        "weights": "ema" if trained.averaged else "model",
        "test_top1": test_top1,
        "test_top1_measured": None
        if test_top1 is None
        else f"by training at epoch {trained.meta.get('epoch')} on {tested} test images, eval.tta={cfg.eval.tta}",
    }
    stem = f"{trained.out_dir.name}-{trained.tag}"
    out_dir = _out_folder(out, trained.out_dir, stem)
    written = export_model(trained.model(), formats, out_dir, stem, check_batches(dataset, cfg.augment), sidecar)
    for path in written[:-1]:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"wrote {written[-1]} (input size, normalisation, class names; `cifar100 predict model={written[0]} ...`)")
    return written[-1]


def _out_folder(out: str | None, out_dir: Path, stem: str) -> Path:
    """Where the files go: `<run>/export` (never through a link planted there), or `out=` when it
    lies outside every run folder."""
    default = out_dir / "export"
    if out is None or os.path.realpath(out) == os.path.realpath(default):
        return make_folders(out_dir, "export")
    refuse_run_folder(Path(out) / stem, f"out={out}")
    return Path(out)


def check_batches(dataset: cifar_data.Cifar100, augment: Any) -> list[torch.Tensor]:
    """Normalised batches of real test images, one per size in `CHECK_BATCHES`, no image twice."""
    edges = np.cumsum((0, *CHECK_BATCHES)).tolist()
    test = dataset.test.images
    return [normalize_batch(test[a:b], augment.mean, augment.std) for a, b in itertools.pairwise(edges)]


def export_model(
    model: nn.Module,
    formats: tuple[str, ...],
    out_dir: Path,
    stem: str,
    batches: list[torch.Tensor],
    sidecar: dict[str, Any],
) -> list[Path]:
    """Write `<stem>.onnx` / `<stem>.pt2` (as `formats` says) and `<stem>.json` into `out_dir`, each
    model file checked on `batches` first; returns the paths written, the JSON last."""
    model = _fp32_copy(model)
    with torch.no_grad():
        reference = [model(x) for x in batches]
    try:  # before minutes of exporting: can the folder take files?
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out={out_dir}: cannot write there ({err.strerror or err})") from None
    check_writable(out_dir, f"out={out_dir}")
    finals = [out_dir / f"{stem}.{fmt}" for fmt in formats] + [out_dir / f"{stem}.json"]
    example = torch.cat(batches)[:EXAMPLE_BATCH]
    files: dict[Path, bytes] = {}
    checks: dict[str, Any] = {}
    for fmt, final in zip(formats, finals):
        writer = _onnx_bytes if fmt == "onnx" else _program_bytes
        files[final], runner = writer(model, example, final)
        checks[fmt] = check(fmt, runner, batches, reference)
    data = {**sidecar, "files": {fmt: path.name for fmt, path in zip(formats, finals)}, "checks": checks}
    data["versions"] = {name: _version(name) for name in ("torch", "onnxscript", "onnxruntime")}
    files[finals[-1]] = (json.dumps(data, indent=2) + "\n").encode()
    try:
        write_all_atomic(files)
    except OSError as err:
        raise UserError(f"out={out_dir}: cannot write there ({err.strerror or err}); nothing written") from None
    return finals


def check(fmt: str, runner: Runner, batches: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, Any]:
    """Compare the exported model's logits with PyTorch's on every batch; raises on a miss, else
    returns what was compared (batch sizes, largest difference, tolerance)."""
    scale = max(float(r.abs().max()) for r in reference)
    tolerance = RELATIVE_TOLERANCE * max(scale, 1e-6)
    worst, flipped = 0.0, 0
    for x, want in zip(batches, reference):
        got = runner(x)
        if got.shape != want.shape:
            raise UserError(
                f"{fmt} export failed its check: logits of shape {tuple(got.shape)} for a batch of {len(x)}"
            )
        worst = max(worst, float((got - want).abs().max()))
        flipped += int((got.argmax(1) != want.argmax(1)).sum())
    if not worst <= tolerance or flipped:  # `not <=`: a NaN fails too
        raise UserError(
            f"{fmt} export failed its check against PyTorch on {sum(map(len, batches))} test images: logits differ "
            f"by up to {worst:.3g} (tolerance {tolerance:.3g}), top-1 differs on {flipped}; nothing written"
        )
    return {
        "batch_sizes": [len(x) for x in batches],
        "max_abs_logit_diff": worst,
        "tolerance": tolerance,
        "top1_identical": True,
    }


def _fp32_copy(model: nn.Module) -> nn.Module:
    """A copy in fp32, contiguous, eval mode, on the CPU, however the original was held."""
    return copy.deepcopy(model).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()


def _quiet(what: str, action: Callable[[], Any]) -> Any:
    """Run an exporter without its progress prints and warnings; its failure becomes one line."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return action()
    except Exception as err:
        raise UserError(f"{what} failed: {type(err).__name__}: {model_files.first_line(err)}") from None


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _onnx_bytes(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[bytes, Runner]:
    """The ONNX file's bytes (one self-contained model, made in memory) and a runner of them,
    through the same checks predict makes of a file it is given."""
    program = _quiet(
        "ONNX export",
        lambda: torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            dynamic_shapes=_dynamic_batch(),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=OPSET,
        ),
    )
    data = program.model_proto.SerializeToString()
    session = model_files.onnx_session(data, path, model_files.check_onnx(data, path))
    return data, lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def _program_bytes(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[bytes, Runner]:
    """The `.pt2` archive's bytes, with no example inputs (torch saves them as a pickle), and a
    runner of them loaded as predict loads a file it is given."""
    program = _quiet("torch.export", lambda: torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch()))
    program.example_inputs = None
    buffer = io.BytesIO()
    _quiet("torch.export.save", lambda: torch.export.save(program, buffer))
    loaded = model_files.load_program(buffer.getvalue(), path)
    return buffer.getvalue(), lambda x: loaded(x).detach()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
