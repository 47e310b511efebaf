"""A trained model from a run folder: which checkpoint `run=`, `checkpoint=` and `weights=` name, its
weights, and the config it was trained with (the checkpoint's own `meta.json`), for eval, predict
and export alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.config import Config, apply_overrides, from_dict
from cifar100.data import cifar as cifar_data
from cifar100.errors import UserError
from cifar100.runfolder.checkpoint import EMA_FILE, apply_weights, load_ema, load_weights, read_meta
from cifar100.runfolder.rundir import run_of
from cifar100.runfolder.tracking import read_metrics
from cifar100.training.models import build_model

WEIGHTS_CHOICES = ("model", "ema")


@dataclass(frozen=True)
class Trained:
    """One checkpoint's weights and the config that trained them."""

    checkpoint: Path  # the checkpoint folder
    out_dir: Path  # where outputs about it go: its run folder, or the checkpoint folder itself
    tag: str  # names the outputs: best, last or the folder's name, plus -ema for averaged weights
    meta: dict[str, Any]
    cfg: Config  # the checkpoint's config with the command's overrides
    weights: dict[str, torch.Tensor]
    averaged: bool  # the weights are the averaged (EMA) ones, whichever file held them

    def model(self) -> nn.Module:
        """A fresh fp32 model in eval mode on the CPU, in the default (contiguous) memory format, with these weights."""
        model = build_model(self.cfg.model, cifar_data.NUM_CLASSES)
        apply_weights(model, self.weights, self.checkpoint)
        return model.eval()

    def placed(self, device: torch.device) -> nn.Module:
        """`model()` on `device`, in the memory format it trained in (`train.channels_last`), as eval runs it."""
        model = self.model()
        if self.cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.to(device)

    def trained_test_top1(self) -> float | None:
        """The test top-1 training measured for these weights at this checkpoint's epoch (metrics.jsonl),
        None where the checkpoint is not at the end of an epoch or the run folder has no such row."""
        epoch = self.meta.get("epoch")
        if self.meta.get("step_in_epoch", 0) != 0 or epoch is None:
            return None
        key = "ema_test_top1" if self.averaged else "test_top1"
        try:
            rows = read_metrics(self.out_dir / "metrics.jsonl")
        except UserError:
            return None  # the export goes on without the figure
        return next((float(row[key]) for row in rows if row["epoch"] == epoch and key in row), None)


def resolve_checkpoint(run: str | None, checkpoint: str) -> tuple[Path, Path, str]:
    """(checkpoint folder, output folder, tag) for `run=` and `checkpoint=best|last|<path>`.

    The tag names the outputs (`eval-<tag>.json`): best, last, or the given folder's name. The output
    folder is the run folder the checkpoint lies in (a set-aside one in `checkpoints/abandoned/`
    too), or the checkpoint folder itself outside any run. A checkpoint path that lies in a run
    folder other than `run=` is refused: outputs about one run's weights would land in another's
    folder under its name.
    """
    run_dir = Path(run) if run is not None else None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        raise UserError(f"run={run}: not a run folder (no config.yaml)")
    if checkpoint in ("best", "last"):
        if run_dir is None:
            raise UserError(
                f"checkpoint={checkpoint} needs run=<run folder>, or give checkpoint=<path to a checkpoint folder>"
            )
        ckpt = run_dir / "checkpoints" / checkpoint
        if not ckpt.exists():
            raise UserError(
                f"run={run}: no checkpoints/{checkpoint} (no checkpoint written yet): train the run first, "
                "or give checkpoint=<path to a checkpoint folder>"
            )
        return ckpt, run_dir, checkpoint
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint={checkpoint}: expected best, last or a checkpoint folder")
    owner = run_of(ckpt.resolve())
    in_a_run = owner is not None and (owner / "config.yaml").is_file()
    if run_dir is not None:
        if in_a_run and owner != run_dir.resolve():
            raise UserError(
                f"checkpoint={checkpoint} belongs to run {owner}, not run={run}: give run={owner} or drop run="
            )
        return ckpt, run_dir, ckpt.name
    return ckpt, owner if in_a_run and owner is not None else ckpt, ckpt.name


def load_trained(run: str | None, checkpoint: str, overrides: list[str], which: str = "model") -> Trained:
    """The checkpoint `run=`/`checkpoint=` name, with the model's weights or (`which="ema"`) the averaged ones."""
    if which not in WEIGHTS_CHOICES:
        raise UserError(f"weights={which!r}: expected one of {', '.join(WEIGHTS_CHOICES)}")
    ckpt, out_dir, tag = resolve_checkpoint(run, checkpoint)
    weights = load_weights(ckpt)  # checks COMPLETE first: a half-written checkpoint is refused
    meta = read_meta(ckpt)
    if which == "ema":
        averaged = load_ema(ckpt)
        if averaged is None:
            held = "the averaged weights already, as model.safetensors" if meta.get("weights") == "ema" else "none"
            raise UserError(
                f"{ckpt}: no {EMA_FILE} (this checkpoint holds {held}); weights=ema needs a step "
                "checkpoint (checkpoint=last) of a run with train.ema.enabled=true"
            )
        weights = averaged
        tag += "-ema"
    if "config" not in meta:
        raise UserError(f"{ckpt / 'meta.json'}: no config recorded, cannot rebuild the model")
    try:
        from_dict(meta["config"])
    except UserError as err:
        raise UserError(f"{ckpt / 'meta.json'}: its config is not one this version can use ({err})") from None
    cfg = apply_overrides(meta["config"], overrides)
    return Trained(ckpt, out_dir, tag, meta, cfg, weights, which == "ema" or meta.get("weights") == "ema")
