"""Checkpoints as folders that appear whole or not at all, and loading that runs no foreign code.

A checkpoint is `checkpoints/<tag>/` with `model.safetensors` (weights: no pickle at all),
`train_state.pt` (optimizer, schedule, RNG: tensors and plain data, loaded with
`weights_only=True`), `meta.json`, and `COMPLETE`, written last. It is built under a temporary
name and renamed into place, so a crash mid-save leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cifar100.errors import UserError

MARKER = "COMPLETE"


def save_checkpoint(ckpt_dir: Path, tag: str, model_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `ckpt_dir/<tag>/` atomically, replacing an older checkpoint of the same tag."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp, final, old = ckpt_dir / f".tmp-{tag}", ckpt_dir / tag, ckpt_dir / f".old-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _fsync_tree(tmp)
    (tmp / MARKER).write_text("ok\n")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    """True when the folder holds a finished checkpoint."""
    return (path / MARKER).is_file() and (path / "model.safetensors").is_file()


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder (safetensors: no code can run while loading)."""
    if not is_complete(path):
        raise UserError(f"{path}: not a complete checkpoint (no {MARKER} marker or no model.safetensors)")
    try:
        return load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path / 'model.safetensors'}: unreadable ({err})") from None


def load_train_state(path: Path) -> dict[str, Any]:
    """Optimizer, schedule and RNG state, refusing anything but tensors and plain data."""
    file = path / "train_state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{file}: refused, it holds objects other than tensors and plain data ({str(err).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"{file}: unreadable ({str(err).splitlines()[0]})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's meta.json (epoch, step, config, ...)."""
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path / 'meta.json'}: unreadable ({err})") from None


def apply_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights into the model, listing mismatched keys and shapes instead of a stack trace."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)) if keys]
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
