"""`cifar100 predict`: top-k classes and the superclass of a user's own image files.

The model is a run's checkpoint (`run=`, `checkpoint=`, `weights=`), scored exactly as `cifar100 eval`
scores the test set: the same normalisation, memory format, precision, batch size and test-time
flip (`engine.score_batch`), so the test images written out as PNG files get eval's top-1. Or it is a
file `cifar100 export` wrote (`model=FILE.onnx|FILE.pt2`), run by onnxruntime or torch with the
normalisation and class names of the JSON beside it. Images are read as `images.py` says, in
batches, on the best device there is. The answer is a table on the terminal or, with `out=`, a CSV
or JSON file written whole or not at all.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cifar100.commands import export, images
from cifar100.commands.trained import load_trained
from cifar100.data import cifar as cifar_data
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError
from cifar100.runfolder.tracking import write_atomic
from cifar100.training.engine import EvalSettings, score_batch
from cifar100.training.runtime import device_type, resolve_precision, usable_cores

EXPORTED_BATCH = 256  # images per call of an exported model
BAR_FROM = 256  # a progress bar for more images than this
OUT_SUFFIXES = (".csv", ".json")


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


def file_predictor(model_file: str, overrides: list[str]) -> Predictor:
    """An exported model (.onnx through onnxruntime, .pt2 through torch.export) with its sidecar JSON."""
    path = Path(model_file)
    kind = path.suffix.lower()
    if kind not in (".onnx", ".pt2"):
        raise UserError(f"model={model_file}: expected a .onnx or .pt2 file written by cifar100 export")
    if not path.is_file():
        raise UserError(f"model={model_file}: no such file")
    info = export.read_sidecar(path)
    tta = info.get("tta", "none")
    for item in overrides:
        key, _, value = item.partition("=")
        if key != "eval.tta" or value not in ("none", "flip"):
            raise UserError(f"{item}: model= takes no training config; its only setting is eval.tta=none|flip")
        tta = value
    device = torch.device(device_type())
    run: Callable[[torch.Tensor], torch.Tensor]
    if kind == ".onnx":
        export.require_onnx()
        import onnxruntime

        wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
        session = export.onnx_session(path, providers)
        inputs = session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != info["input_size"]:
            shapes = ", ".join(str(i.shape) for i in inputs)
            raise UserError(f"{path}: takes input {shapes}, not a batch of {info['input_size']} images")
        name = inputs[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])

    else:
        module = export.load_program(path, device)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x.to(device)).float().cpu()

    mean, std = info["mean"], info["std"]

    def checked(x: torch.Tensor) -> torch.Tensor:
        try:
            scores = run(x)
        except Exception as err:  # a file that loads but is not a CIFAR-100 classifier
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise UserError(f"{path}: failed on a batch of {len(x)} images ({first.strip()[:200]})") from None
        if tuple(scores.shape) != (len(x), len(info["classes"])):
            raise UserError(f"{path}: gave outputs of shape {tuple(scores.shape)}, not {len(x)} x 100 logits")
        return scores

    def logits(batch: torch.Tensor, pad: bool) -> torch.Tensor:
        x = normalize_batch(batch, mean, std)
        return (checked(x) + checked(x.flip(3))) / 2 if tta == "flip" else checked(x)

    describe = {"model": str(path.resolve()), "checkpoint": info.get("checkpoint"), "tta": tta}
    return Predictor(
        describe,
        logits,
        EXPORTED_BATCH,
        tuple(info["classes"]),
        tuple(info["superclasses"]),
        np.asarray(info["fine_to_coarse"]),
    )


def check_out(out: str | None) -> Path | None:
    """The `out=` file, refused before any work when its suffix is wrong or its folder cannot take it."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"out={out}: expected a .csv or .json file")
    if path.is_dir():
        raise UserError(f"out={out}: is a folder; give a file name ending in .csv or .json")
    probe = path.with_name(f".{path.name}.tmp")
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"out={out}: cannot write there ({err.strerror or err})") from None
    return path


def batches(paths: list[Path], size: int) -> Iterator[torch.Tensor]:
    """The images of `paths` in order as uint8 (B, 3, 32, 32) tensors, decoded by a pool of threads
    (PIL decodes and resizes with the GIL released)."""
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        for start in range(0, len(paths), size):
            chunk = paths[start : start + size]
            yield torch.from_numpy(np.stack(list(pool.map(images.read_image, chunk))))


def predict(predictor: Predictor, paths: list[Path], topk: int) -> dict[str, Any]:
    """Top-k classes (with probabilities) and the superclass of each image: the JSON `out=` writes."""
    rows: list[dict[str, Any]] = []
    pad = len(paths) > predictor.batch_size  # as eval pads: every batch of one shape
    with tqdm(total=len(paths), unit="img", disable=len(paths) <= BAR_FROM, leave=False) as bar:
        for batch in batches(paths, predictor.batch_size):
            probs = torch.softmax(predictor.logits(batch, pad).double(), dim=1).numpy()
            done = len(rows)
            rows += [_answer(paths[done + i], row, topk, predictor) for i, row in enumerate(probs)]
            bar.update(len(batch))
    return {**predictor.describe, "topk": topk, "images": len(rows), "predictions": rows}


def _answer(path: Path, probs: np.ndarray, topk: int, predictor: Predictor) -> dict[str, Any]:
    top = np.argsort(-probs, kind="stable")[:topk]
    superclass = int(predictor.fine_to_coarse[top[0]])  # the top-1 class's superclass ...
    share = float(probs[predictor.fine_to_coarse == superclass].sum())  # ... and its classes' summed probability
    return {
        "file": str(path),
        "top": [{"class": predictor.classes[i], "index": int(i), "probability": float(probs[i])} for i in top],
        "superclass": {"name": predictor.superclasses[superclass], "index": superclass, "probability": share},
    }


def to_csv(result: dict[str, Any]) -> str:
    """One row per image: file, superclass and its probability, then class and probability for each of the top k."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    ks = range(1, result["topk"] + 1)
    writer.writerow(
        ["file", "superclass", "superclass_probability", *[f"{w}_{k}" for k in ks for w in ("class", "probability")]]
    )
    for row in result["predictions"]:
        tops = [value for t in row["top"] for value in (t["class"], f"{t['probability']:.6f}")]
        writer.writerow([row["file"], row["superclass"]["name"], f"{row['superclass']['probability']:.6f}", *tops])
    return text.getvalue()


def to_table(result: dict[str, Any]) -> str:
    """The terminal's table: file, superclass, then the top k classes, each with its probability."""
    rows = result["predictions"]
    file_width = max(len("file"), *(len(r["file"]) for r in rows))
    super_width = max(len(r["superclass"]["name"]) for r in rows)
    class_width = max(len(t["class"]) for r in rows for t in r["top"])
    head = [f"{'file':<{file_width}}", f"{'superclass':<{super_width + 7}}"]
    head += [f"{f'top-{k}':<{class_width + 7}}" for k in range(1, len(rows[0]["top"]) + 1)]
    lines = ["  ".join(head).rstrip()]
    for r in rows:
        cells = [
            f"{r['file']:<{file_width}}",
            _cell(r["superclass"]["name"], r["superclass"]["probability"], super_width),
        ]
        cells += [_cell(t["class"], t["probability"], class_width) for t in r["top"]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cell(name: str, probability: float, width: int) -> str:
    return f"{name:<{width}} {probability:>6.1%}"


def run_predict(
    run: str | None,
    model: str | None,
    checkpoint: str | None,
    which: str | None,
    topk_text: str | None,
    out: str | None,
    overrides: list[str],
    inputs: list[str],
) -> dict[str, Any]:
    """The whole command: check the arguments and `out=`, find the images, predict, write or print."""
    try:
        topk = int(topk_text) if topk_text is not None else 5
    except ValueError:
        raise UserError(f"topk={topk_text}: expected a whole number from 1 to 100") from None
    if not 1 <= topk <= cifar_data.NUM_CLASSES:
        raise UserError(f"topk={topk_text}: expected a whole number from 1 to 100")
    if model is not None and (run is not None or checkpoint is not None or which is not None):
        raise UserError("model= is an exported file: give it alone, or run= [checkpoint=] [weights=] instead")
    if model is None and run is None and checkpoint is None:
        raise UserError("predict needs run=<run folder> (or checkpoint=PATH) or model=FILE.onnx|FILE.pt2")
    target = check_out(out)
    paths = images.find_images(inputs)
    predictor = (
        file_predictor(model, overrides)
        if model is not None
        else run_predictor(run, checkpoint or "best", which or "model", overrides)
    )
    result = predict(predictor, paths, topk)
    if target is None:
        print(to_table(result))
        return result
    text = json.dumps(result, indent=2) + "\n" if target.suffix.lower() == ".json" else to_csv(result)
    try:
        write_atomic(target, text.encode())
    except OSError as err:
        raise UserError(f"out={out}: not written ({err.strerror or err})") from None
    print(f"{len(paths)} image(s) predicted ({_source(result)}): wrote {target}")
    return result


def _source(result: dict[str, Any]) -> str:
    what = result.get("model") or f"{result['checkpoint']}"
    return f"{what}, tta={result['tta']}" + (f", weights={result['weights']}" if "weights" in result else "")
