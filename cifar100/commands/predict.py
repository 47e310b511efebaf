"""`cifar100 predict`: top-k classes and the superclass of a user's own image files.

The model is a run's checkpoint (`run=`, `checkpoint=`, `weights=`), scored exactly as `cifar100 eval`
scores the test set: the same normalisation, memory format, precision, batch size and test-time
flip (`evaluation.score_batch`), so the test images written out as PNG files get eval's top-1. Or it is a
file `cifar100 export` wrote (`model=FILE.onnx|FILE.pt2`), checked by `model_files` before it is
loaded, run by onnxruntime or torch with the normalisation and class names of the JSON beside it,
each batch within `timeout=` seconds. Images are read as `images.py` says, in batches, on the best
device there is; a picture that cannot be read is refused in one line of its own and the others
are answered. The answer is a table on the terminal or, with `out=`, a CSV or JSON file written
whole or not at all (`predictions.py`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cifar100.commands import images, model_files
from cifar100.commands.predictions import file_text, to_csv, to_json, to_table
from cifar100.commands.trained import load_trained
from cifar100.data import cifar as cifar_data
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError, clip
from cifar100.runfolder.safe_files import check_writable, refuse_run_folder, write_atomic
from cifar100.training.evaluation import EvalSettings, score_batch
from cifar100.training.runtime import device_type, resolve_precision, usable_cores

EXPORTED_BATCH = 256  # images per call of an exported model
BAR_FROM = 256  # a progress bar for more images than this
OUT_SUFFIXES = (".csv", ".json")
Runner = Callable[[torch.Tensor], torch.Tensor]  # normalised images -> logits
TIMEOUT = 300.0  # seconds an exported model may take for one batch (timeout= changes it)


@dataclass(frozen=True)
class Predictor:
    """Logits for uint8 (B, 3, 32, 32) batches, and the names of what they score."""

    describe: dict[str, Any]  # what answered: the run and checkpoint, or the exported file
    logits: Callable[[torch.Tensor, bool], torch.Tensor]  # (images, pad the batch to batch_size) -> (B, 100)
    batch_size: int
    classes: tuple[str, ...]
    superclasses: tuple[str, ...]
    fine_to_coarse: np.ndarray


def run_predictor(run: str | None, checkpoint: str, which: str, overrides: list[str]) -> Predictor:
    """A run's checkpoint on the best device, with eval's settings from its config (plus overrides)."""
    from accelerate import Accelerator  # only this kind of predictor needs it

    trained = load_trained(run, checkpoint, overrides, which)
    cfg = trained.cfg
    dataset = cifar_data.load(cfg.data.root, cfg.data.download)
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.train.precision, device_type()))
    model = trained.placed(accelerator.device)
    settings = EvalSettings.from_config(cfg)

    def logits(batch: torch.Tensor, pad: bool) -> torch.Tensor:
        return score_batch(model, batch.to(accelerator.device), settings, accelerator, pad).cpu()

    describe = {
        "checkpoint": str(trained.checkpoint.resolve()),
        "checkpoint_tag": trained.tag,
        "epoch": trained.meta.get("epoch"),
        "weights": "ema" if trained.averaged else "model",
        "tta": cfg.eval.tta,
        "device": str(accelerator.device),
    }
    return Predictor(
        describe,
        logits,
        settings.batch_size,
        dataset.classes,
        dataset.superclasses,
        cifar_data.fine_to_coarse(dataset),
    )


def file_predictor(model_file: str, overrides: list[str], timeout: float = TIMEOUT) -> Predictor:
    """An exported model (.onnx through onnxruntime, .pt2 through torch.export), checked by
    `model_files` before anything else is read or loaded, with its sidecar JSON; loading it and each
    batch given `timeout` seconds."""
    path = Path(model_file)
    kind = path.suffix.lower()
    if kind not in (".onnx", ".pt2"):
        raise UserError(f"model={model_file}: expected a .onnx or .pt2 file written by cifar100 export")
    tta = None
    for item in overrides:
        key, _, value = item.partition("=")
        if key != "eval.tta" or value not in ("none", "flip"):
            raise UserError(f"{item}: model= takes no training config; its only setting is eval.tta=none|flip")
        tta = value
    data = model_files.read_model_file(path)
    # What the file holds decides, whatever the JSON beside it says.
    external = kind == ".onnx" and model_files.check_onnx(data, path)
    if kind == ".pt2":
        model_files.check_program(data, path)
    info = model_files.read_sidecar(path)
    tta = tta or info.get("tta", "none")
    with _deadline(path, "loading it", timeout):  # onnxruntime computes a graph's constant parts as it loads it
        run = _onnx_runner(data, path, info, external) if kind == ".onnx" else _program_runner(data, path)
    describe = {"model": str(path.resolve()), "checkpoint": info.get("checkpoint"), "tta": tta}
    return Predictor(
        describe,
        _exported_logits(run, path, info, tta, timeout),
        EXPORTED_BATCH,
        tuple(info["classes"]),
        tuple(info["superclasses"]),
        np.asarray(info["fine_to_coarse"]),
    )


def _exported_logits(
    run: Runner, path: Path, info: dict[str, Any], tta: str, timeout: float
) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    """`Predictor.logits` of an exported model: the sidecar's normalisation, each batch within
    `timeout` and checked to be 100 logits per image."""

    def checked(x: torch.Tensor) -> torch.Tensor:
        with _deadline(path, f"a batch of {len(x)} images", timeout):
            try:
                scores = run(x)
            except Exception as err:  # a file that loads but is not a CIFAR-100 classifier
                raise UserError(
                    f"{path}: failed on a batch of {len(x)} images ({model_files.first_line(err)})"
                ) from None
        if tuple(scores.shape) != (len(x), len(info["classes"])):
            raise UserError(f"{path}: gave outputs of shape {tuple(scores.shape)}, not {len(x)} x 100 logits")
        return scores

    def logits(batch: torch.Tensor, pad: bool) -> torch.Tensor:
        x = normalize_batch(batch, info["mean"], info["std"])
        return (checked(x) + checked(x.flip(3))) / 2 if tta == "flip" else checked(x)

    return logits


def _onnx_runner(data: bytes, path: Path, info: dict[str, Any], external: bool) -> Runner:
    import onnxruntime

    wanted = ["CUDAExecutionProvider"] if device_type() == "cuda" else []
    providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
    session = model_files.onnx_session(data, path, external, providers)
    inputs = session.get_inputs()
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != info["input_size"]:
        shapes = ", ".join(str(i.shape) for i in inputs)
        raise UserError(f"{path}: takes input {shapes}, not a batch of {info['input_size']} images")
    name = inputs[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])


def _program_runner(data: bytes, path: Path) -> Runner:
    device = torch.device(device_type())
    module = model_files.load_program(data, path, device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.to(device)).float().cpu()

    return run


@contextlib.contextmanager
def _deadline(path: Path, doing: str, seconds: float) -> Iterator[None]:
    """Run the block, or end the process in one line when it takes longer than `seconds`: a model
    file's graph may run for hours, and neither onnxruntime nor torch can be stopped in the middle
    of an operator. Nothing is lost: predict writes its answer only at the end."""

    def expire() -> None:
        print(
            f"error: {path}: {doing} took longer than timeout={seconds:g} s; predict stops (nothing was written): "
            "a file from cifar100 export answers in seconds; give a larger timeout= for a slower one",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def check_out(out: str | None) -> Path | None:
    """The `out=` file, refused before any work when its suffix is wrong, it lies inside a run folder
    (whose files are the run's) or its folder cannot take it."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"out={out}: expected a .csv or .json file")
    if path.is_dir():
        raise UserError(f"out={out}: is a folder; give a file name ending in .csv or .json")
    refuse_run_folder(path, f"out={out}")
    check_writable(path.parent, f"out={out}")
    return path


def batches(paths: list[Path], size: int, refused: list[dict[str, str]]) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """The images of `paths` in order, `size` at a time, as (their paths, uint8 (B, 3, 32, 32)),
    decoded by a pool of threads (PIL decodes and resizes with the GIL released) within one pixel
    budget. A picture that cannot be read is left out and added to `refused` with why."""
    budget = images.PixelBudget()

    def read(path: Path) -> np.ndarray | str:
        try:
            return images.read_image(path, budget)
        except UserError as err:
            return str(err)

    with images.quiet_pil(), ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        for start in range(0, len(paths), size):
            chunk = paths[start : start + size]
            decoded = list(pool.map(read, chunk))
            refused += [{"file": file_text(p), "reason": why} for p, why in zip(chunk, decoded) if isinstance(why, str)]
            kept = [(path, image) for path, image in zip(chunk, decoded) if not isinstance(image, str)]
            if kept:
                yield [path for path, _ in kept], torch.from_numpy(np.stack([image for _, image in kept]))


def predict(predictor: Predictor, paths: list[Path], topk: int) -> dict[str, Any]:
    """Top-k classes (with probabilities) and the superclass of each image that could be read, and
    the refused ones with why: the JSON `out=` writes. Refusing them all is one line."""
    rows: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    pad = len(paths) > predictor.batch_size  # as eval pads: every batch of one shape
    with tqdm(total=len(paths), unit="img", disable=len(paths) <= BAR_FROM, leave=False) as bar:
        for kept, batch in batches(paths, predictor.batch_size, refused):
            probs = torch.softmax(predictor.logits(batch, pad).double(), dim=1).numpy()
            rows += [_answer(path, row, topk, predictor) for path, row in zip(kept, probs)]
            bar.update(len(batch))
    if len(paths) == 1 and refused:
        raise UserError(refused[0]["reason"])
    for refusal in refused:
        warnings.warn(refusal["reason"], stacklevel=2)
    if not rows:
        raise UserError(f"none of the {len(paths)} images could be read (each is named above); nothing was written")
    result = {**predictor.describe, "topk": topk, "images": len(rows), "predictions": rows}
    return result | ({"refused": refused} if refused else {})


def _answer(path: Path, probs: np.ndarray, topk: int, predictor: Predictor) -> dict[str, Any]:
    top = np.argsort(-probs, kind="stable")[:topk]
    superclass = int(predictor.fine_to_coarse[top[0]])  # the top-1 class's superclass ...
    share = float(probs[predictor.fine_to_coarse == superclass].sum())  # ... and its classes' summed probability
    return {
        "file": file_text(path),
        "top": [{"class": predictor.classes[i], "index": int(i), "probability": float(probs[i])} for i in top],
        "superclass": {"name": predictor.superclasses[superclass], "index": superclass, "probability": share},
    }


def run_predict(
    run: str | None,
    model: str | None,
    checkpoint: str | None,
    which: str | None,
    topk_text: str | None,
    out: str | None,
    overrides: list[str],
    inputs: list[str],
    timeout_text: str | None = None,
) -> dict[str, Any]:
    """The whole command: check the arguments and `out=`, find the images, predict, write or print."""
    topk = _whole_number("topk", topk_text, 5, cifar_data.NUM_CLASSES)
    timeout = float(_whole_number("timeout", timeout_text, int(TIMEOUT), 10**6))
    if model is not None and (run is not None or checkpoint is not None or which is not None):
        raise UserError("model= is an exported file: give it alone, or run= [checkpoint=] [weights=] instead")
    if model is None and run is None and checkpoint is None:
        raise UserError("predict needs run=<run folder> (or checkpoint=PATH) or model=FILE.onnx|FILE.pt2")
    if timeout_text is not None and model is None:
        raise UserError("timeout= bounds an exported model file's batches: give it with model= only")
    target = check_out(out)
    paths = images.find_images(inputs)
    predictor = (
        file_predictor(model, overrides, timeout)
        if model is not None
        else run_predictor(run, checkpoint or "best", which or "model", overrides)
    )
    result = predict(predictor, paths, topk)
    if target is None:
        print(to_table(result))
        return result
    text = to_json(result) if target.suffix.lower() == ".json" else to_csv(result)
    try:
        write_atomic(target, text.encode())
    except OSError as err:
        raise UserError(f"out={out}: not written ({err.strerror or err})") from None
    refused = f", {len(result['refused'])} refused (named above)" if "refused" in result else ""
    print(f"{result['images']} image(s) predicted{refused} ({_source(result)}): wrote {target}")
    return result


def _whole_number(key: str, text: str | None, default: int, most: int) -> int:
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= most):
        raise UserError(f"{key}={clip(text)}: expected a whole number from 1 to {most}")
    return int(text)


def _source(result: dict[str, Any]) -> str:
    what = result.get("model") or f"{result['checkpoint']}"
    return f"{what}, tta={result['tta']}" + (f", weights={result['weights']}" if "weights" in result else "")
