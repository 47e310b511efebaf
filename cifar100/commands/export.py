"""`cifar100 export`: a trained model as an ONNX file and a `torch.export` program, each checked
against the PyTorch model before it is declared written, and the JSON a caller needs beside them.

Both are exported from a fresh fp32 copy of the model in eval mode, on the CPU and in the default
memory format, so neither bf16 nor channels_last training reaches the files. The batch dimension is
dynamic (traced on an example of several images: one would freeze it at 1). The check runs the
written file (onnxruntime's CPU session; `torch.export.load(...).module()`) on real test images
at batch sizes `CHECK_BATCHES` and asks for every logit within `RELATIVE_TOLERANCE` of the largest
|logit| of PyTorch's and for the same top-1 class on every image. The files are built under
temporary names and renamed into place only when every check passed; a failed one leaves nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import json
import logging
import os
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from cifar100.commands import images
from cifar100.commands.trained import load_trained
from cifar100.data import cifar as cifar_data
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError

FORMATS = ("onnx", "pt2")
CHECK_BATCHES = (1, 2, 37)  # one, two and an odd number of real test images, each batch its own
EXAMPLE_BATCH = 4  # traced with this many images: the batch dimension stays dynamic
RELATIVE_TOLERANCE = 1e-4  # of the largest |logit| the PyTorch model gives on the check images
OPSET = 18  # the first with Mish as an ONNX operator
INPUT, OUTPUT = "images", "logits"
EXTRA_HINT = 'pip install -e ".[export]"'
SIDECAR_VERSION = 1


def require_onnx() -> None:
    """Refuse ONNX work in one line when the optional packages are missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"ONNX needs the {name} package, part of the export extra: {EXTRA_HINT}") from None


def run_export(run: str | None, checkpoint: str, which: str, fmt: str, out: str | None, overrides: list[str]) -> Path:
    """Export a run's checkpoint in `fmt` (onnx, pt2 or all) into `out` (default <run>/export);
    returns the sidecar JSON's path."""
    if fmt not in (*FORMATS, "all"):
        raise UserError(f"format={fmt}: expected onnx, pt2 or all")
    formats = FORMATS if fmt == "all" else (fmt,)
    if "onnx" in formats:
        require_onnx()
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
    out_dir = Path(out) if out is not None else trained.out_dir / "export"
    stem = f"{trained.out_dir.name}-{trained.tag}"
    written = export_model(trained.model(), formats, out_dir, stem, check_batches(dataset, cfg.augment), sidecar)
    for path in written[:-1]:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"wrote {written[-1]} (input size, normalisation, class names; `cifar100 predict model={written[0]} ...`)")
    return written[-1]


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
    probe = out_dir / f".{stem}.probe"
    try:  # before minutes of exporting: can the folder take files?
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"out={out_dir}: cannot write there ({err.strerror or err})") from None
    finals = [out_dir / f"{stem}.{fmt}" for fmt in formats] + [out_dir / f"{stem}.json"]
    temps = [path.with_name(f".{path.stem}.tmp{path.suffix}") for path in finals]
    checks: dict[str, Any] = {}
    try:
        example = torch.cat(batches)[:EXAMPLE_BATCH]
        for fmt, tmp in zip(formats, temps):
            runner = _write_onnx(model, example, tmp) if fmt == "onnx" else _write_program(model, example, tmp)
            checks[fmt] = check(fmt, runner, batches, reference)
        data = {**sidecar, "files": {fmt: path.name for fmt, path in zip(formats, finals)}, "checks": checks}
        data["versions"] = {name: _version(name) for name in ("torch", "onnxscript", "onnxruntime")}
        temps[-1].write_text(json.dumps(data, indent=2) + "\n")
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    except OSError as err:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise UserError(f"out={out_dir}: cannot write there ({err.strerror or err}); nothing written") from None
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    return finals


def check(
    fmt: str, runner: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], reference: list[torch.Tensor]
) -> dict[str, Any]:
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
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{what} failed: {type(err).__name__}: {first.strip()}") from None


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    _quiet(
        "ONNX export",
        lambda: torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes=_dynamic_batch(),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=OPSET,
            external_data=False,  # one self-contained file
        ),
    )
    session = onnx_session(path)
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def _write_program(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    program = _quiet("torch.export", lambda: torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch()))
    _quiet("torch.export.save", lambda: torch.export.save(program, str(path)))
    loaded = load_program(path)
    return lambda x: loaded(x).detach()


def onnx_session(path: Path, providers: list[str] | None = None) -> Any:
    """An onnxruntime session of the file, or a one-line refusal of a file that is not an ONNX model."""
    require_onnx()
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    except Exception as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{path}: not an ONNX model onnxruntime can load ({first.strip()[:200]})") from None


def load_program(path: Path, device: torch.device | None = None) -> nn.Module:
    """The module of a saved `torch.export` program (moved to `device` by torch's own pass), or a
    one-line refusal."""
    logger = logging.getLogger("torch.export")  # it logs a traceback before it raises
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
            if device is not None and device.type != "cpu":
                program = move_to_device_pass(program, device)
            return program.module()
    except Exception as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{path}: not a torch.export program ({type(err).__name__}: {first.strip()[:200]})") from None
    finally:
        logger.setLevel(level)


def read_sidecar(model_file: Path) -> dict[str, Any]:
    """The JSON `export` wrote beside `model_file` (<stem>.json), checked for what predict needs."""
    path = model_file.with_suffix(".json")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{model_file}: no {path.name} beside it (cifar100 export writes one: the normalisation and class names)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
    problem = _sidecar_problem(data)
    if problem:
        raise UserError(f"{path}: not an export's description ({problem})")
    return data


def _sidecar_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "expected an object"
    for key, count in (("mean", 3), ("std", 3)):
        value = data.get(key)
        if not (isinstance(value, list) and len(value) == count and all(isinstance(v, (int, float)) for v in value)):
            return f"{key} must be {count} numbers"
    if any(v <= 0 for v in data["std"]):
        return "std must be positive"
    for key, count in (("classes", cifar_data.NUM_CLASSES), ("superclasses", 20)):
        value = data.get(key)
        if not (isinstance(value, list) and len(value) == count and all(isinstance(v, str) for v in value)):
            return f"{key} must list {count} names"
    coarse = data.get("fine_to_coarse")
    if not (
        isinstance(coarse, list)
        and len(coarse) == cifar_data.NUM_CLASSES
        and all(isinstance(c, int) and 0 <= c < 20 for c in coarse)
    ):
        return "fine_to_coarse must give each of the 100 classes a superclass 0..19"
    if data.get("input_size") != [3, images.SIZE, images.SIZE]:
        return f"input_size must be [3, {images.SIZE}, {images.SIZE}]"
    if data.get("tta", "none") not in ("none", "flip"):
        return "tta must be none or flip"
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
