"""Checkpoints as folders that appear whole or not at all, and loading that runs no foreign code.

A checkpoint is `checkpoints/step-<global step>/` holding `model.safetensors` (weights: no pickle
at all), `train_state.pt` (optimizer, schedule, scaler, every rank's RNG and partial-epoch sums:
tensors and plain data, loaded with `weights_only=True`), `ema.safetensors` (the averaged
weights, when `train.ema` is on), `meta.json` (position, counters, config, W&B id) and
`COMPLETE`, written last. Each is built under a temporary name and renamed into place; older
ones are pruned only after the new one is complete. `best` links to the weights of the best epoch
(the model's or the averaged ones, as `train.ema.select` says, in `model.safetensors`), `last` to
the newest checkpoint. Training copies its state to host memory and goes on while a
`BackgroundWriter` writes it: a checkpoint costs the step a copy, not a disk write.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from cifar100.errors import UserError, clip
from cifar100.runfolder.records import meta_problem, train_state_problem
from cifar100.runfolder.safe_files import TEXT_BYTES, WEIGHTS_BYTES, link_atomic, read_json, require_regular

MARKER = "COMPLETE"
EMA_FILE = "ema.safetensors"
CHECKPOINT_FILES = ("model.safetensors", "train_state.pt", EMA_FILE, "meta.json", MARKER)  # all a checkpoint holds
PREFIX = "step-"


def step_tag(global_step: int) -> str:
    """The folder name of the checkpoint taken after `global_step` optimizer steps."""
    return f"{PREFIX}{global_step:08d}"


def host_copy(obj: Any) -> Any:
    """`obj` (nested dicts, lists, tuples) with every tensor copied to new CPU memory, so it can be
    written while training changes the originals in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def on_host(snapshot: Snapshot) -> Snapshot:
    """`snapshot` with its tensors copied to new CPU memory (`host_copy`); the meta is shared."""
    return Snapshot(host_copy(snapshot.weights), host_copy(snapshot.state), snapshot.meta, host_copy(snapshot.ema))


class BackgroundWriter:
    """Runs write jobs on one thread, one at a time and in order, while the caller goes on.

    The thread is not a daemon: a process that ends, even by an exception, finishes its write
    first. An exception a job raises is raised again by the next `wait()` or `submit()`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], object]) -> None:
        """Start `job` once the previous one is done."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Return once every submitted job has finished; raise what a job raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as err:
            self._error = err


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint's parts: weights (safetensors), train state (tensors and plain data,
    `train_state.pt`), meta (JSON: position, counters, config) and the averaged weights, if any."""

    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


class CheckpointWriter:
    """Writes snapshots into `checkpoints/` on a background thread, and knows what is on disk: the
    newest complete checkpoint (`last_good`) and the score of the weights under `best/`, which are
    the snapshot's `select`ed ones: "model" or "ema" (its averaged weights).

    A failed write is a warning, never a stop: training goes on and the previous checkpoint stays.
    """

    def __init__(
        self,
        ckpt_dir: Path,
        keep_last: int,
        last_good: Path | None = None,
        best_score: float = -1.0,
        select: str = "model",
    ):
        self.ckpt_dir, self.keep_last, self.select = ckpt_dir, keep_last, select
        self.last_good, self.best_score = last_good, best_score
        self._thread = BackgroundWriter()
        self._submitted: str | None = None
        self._staged: Callable[[], None] | None = None

    @classmethod
    def for_run(
        cls, run_dir: Path, keep_last: int, loaded: Path | None, best_score: float, select: str
    ) -> CheckpointWriter:
        """The writer of `run_dir/checkpoints/`: its last good checkpoint the one this start `loaded`
        (by the name it has there), and `best_score` to beat where best weights are on disk."""
        ckpt_dir = run_dir / "checkpoints"
        # No best weights on disk (a fork from before its source's best epoch): any score beats none.
        best = best_score if (ckpt_dir / "best").exists() else -1.0
        return cls(ckpt_dir, keep_last, loaded and ckpt_dir / loaded.name, best, select=select)

    def submit(self, tag: str, snapshot: Snapshot, score: float | None = None) -> None:
        """`copy` then `start`: write `snapshot` as `tag` in the background."""
        self.copy(tag, snapshot, score)
        self.start()

    def copy(self, tag: str, snapshot: Snapshot, score: float | None = None) -> None:
        """Copy `snapshot` to host memory as the next write, `tag`; with a `score` that beats the best
        on disk, also the best weights. The same tag twice is written once. Training may change the
        originals as soon as this returns."""
        self._thread.wait()  # one copy of the state in host memory at a time; best_score is current
        if tag == self._submitted:
            return
        best = score if score is not None and score > self.best_score else None
        self._staged = partial(self._write, tag, on_host(snapshot), best)
        self._submitted = tag

    def start(self) -> None:
        """Start writing what `copy` took, on the background thread."""
        if self._staged is not None:
            self._thread.submit(self._staged)
            self._staged = None

    def wait(self) -> None:
        """Return once every submitted write has finished."""
        self._thread.wait()

    def _write(self, tag: str, snap: Snapshot, best: float | None) -> None:
        if best is not None:
            try:
                save_best(
                    self.ckpt_dir,
                    tag,
                    # select="ema" only with EMA on (the trainer checks), whose snapshots carry its weights
                    cast(dict[str, torch.Tensor], snap.ema) if self.select == "ema" else snap.weights,
                    {**snap.meta, "weights": self.select},
                )
                self.best_score = best
            except OSError as err:
                held = (self.ckpt_dir / "best").resolve().name if (self.ckpt_dir / "best").exists() else "nothing yet"
                warnings.warn(
                    f"best weights of {tag} not saved ({err.strerror or err}); checkpoints/best still holds {held}",
                    stacklevel=1,
                )
        # The meta says which best is really on disk, so a resumed run compares against that one.
        meta = {**snap.meta, "best_score": self.best_score}
        try:
            save_checkpoint(self.ckpt_dir, tag, snap.weights, snap.state, meta, ema=snap.ema)
            point_link(self.ckpt_dir, "last", tag)
            prune(self.ckpt_dir, self.keep_last)
            self.last_good = self.ckpt_dir / tag
        except OSError as err:
            previous = self.last_good.name if self.last_good else "none"
            warnings.warn(
                f"checkpoint {tag} not saved ({err.strerror or err}); the previous checkpoint "
                f"({previous}) is intact and loadable",
                stacklevel=1,
            )


def save_checkpoint(
    ckpt_dir: Path,
    tag: str,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `ckpt_dir/<tag>/` atomically, replacing an older checkpoint of the same tag.

    On failure (a full disk, say) the partial folder is removed and the error re-raised;
    checkpoints already on disk are untouched.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp, final, old = ckpt_dir / f".tmp-{tag}", ckpt_dir / tag, ckpt_dir / f".old-{tag}"
    if tmp.is_symlink():  # never written through: the checkpoint is built in a folder of its own
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        # Serialised in memory, written by Python: a full disk is then a plain OSError (ENOSPC).
        for name, weights in (("model.safetensors", model_state), (EMA_FILE, ema)):
            if weights is not None:
                (tmp / name).write_bytes(save({k: v.detach().contiguous().cpu() for k, v in weights.items()}))
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        (tmp / "train_state.pt").write_bytes(buffer.getbuffer())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        (tmp / MARKER).write_text("ok\n")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def point_link(ckpt_dir: Path, link: str, tag: str) -> None:
    """Make `checkpoints/<link>` (last, best) a link to `tag`, swapped in atomically: never absent."""
    link_atomic(ckpt_dir / link, tag)


def save_best(ckpt_dir: Path, tag: str, model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights of the best epoch as `best-<tag>/`, then `best` pointed at it and older ones removed."""
    name = f"best-{tag}"
    save_checkpoint(ckpt_dir, name, model_state, {}, meta)
    point_link(ckpt_dir, "best", name)
    for old in ckpt_dir.glob("best-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete step checkpoints, and stale temp folders."""
    steps = sorted(p for p in ckpt_dir.glob(f"{PREFIX}*") if is_complete(p))
    for path in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def is_complete(path: Path) -> bool:
    """True when the folder holds a finished checkpoint."""
    return (path / MARKER).is_file() and (path / "model.safetensors").is_file()


def find_latest(
    ckpt_dir: Path, skipped: list[str] | None = None
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None] | None:
    """The newest checkpoint that loads, with its weights, train state and averaged weights (or None).

    A truncated, corrupt or impossible newer one is skipped with a warning naming it (or, given a
    `skipped` list, a note in it: the caller decides); None when none loads.
    """
    for path in sorted(ckpt_dir.glob(f"{PREFIX}*"), reverse=True):
        try:
            return (path, *read_checkpoint(path))
        except UserError as err:
            if skipped is None:
                warnings.warn(f"skipping checkpoint {path.name}: {err}", stacklevel=2)
            else:
                skipped.append(f"{path.name}: {clip(str(err))}")
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """A step checkpoint's weights, train state and averaged weights (or None), each file checked
    as data (a meta.json or train state of the wrong shape is as unusable as a truncated one)."""
    meta = read_meta(path)
    weights, state = load_weights(path), load_train_state(path)
    problem = train_state_problem(state, meta)
    if problem:
        raise UserError(f"{path / 'train_state.pt'}: unreadable ({problem})")
    return weights, state, load_ema(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder (safetensors: no code can run while loading)."""
    if not is_complete(path):
        raise UserError(f"{path}: not a complete checkpoint (no {MARKER} marker or no model.safetensors)")
    return _read_safetensors(path / "model.safetensors")


def load_ema(path: Path) -> dict[str, torch.Tensor] | None:
    """The averaged weights of a complete checkpoint folder, None when it holds none."""
    return _read_safetensors(path / EMA_FILE) if (path / EMA_FILE).exists() else None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    require_regular(file, WEIGHTS_BYTES, "weights file")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{file}: unreadable ({err})") from None


def load_train_state(path: Path) -> dict[str, Any]:
    """Optimizer, schedule and RNG state, refusing anything but tensors and plain data."""
    file = path / "train_state.pt"
    require_regular(file, WEIGHTS_BYTES, "train state")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{file}: refused, it holds objects other than tensors and plain data ({str(err).splitlines()[0]})"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"{file}: unreadable ({str(err).splitlines()[0]})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's meta.json (position, counters, config, ...), checked as data."""
    try:
        meta = read_json(path / "meta.json", TEXT_BYTES, "checkpoint's meta.json")
    except FileNotFoundError:
        raise UserError(f"{path / 'meta.json'}: missing") from None
    problem = meta_problem(meta, resumable=path.name.startswith(PREFIX))
    if problem:
        raise UserError(f"{path / 'meta.json'}: unreadable ({problem})")
    return meta


def apply_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights into the model, listing mismatched keys and shapes instead of a stack trace."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        parts = [
            f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes))
            if keys
        ]
        raise UserError(f"{source}: checkpoint does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(weights)


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with file.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
