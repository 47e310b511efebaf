"""A run's held-out scores: every split scored exactly, by the model and (as `ema_<split>_*`) by the
averaged weights, at the evaluation batch the memory fitting set. Under train.micro_batch=auto an
evaluation that runs out of memory (training's heap grew after the trial) halves its batch, and the
smaller batch is kept for the rest of the run; the one evaluation is evaluation.py's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from cifar100.training import memory
from cifar100.training.ema import WeightAverage
from cifar100.training.evaluation import EvalResult, EvalSettings, evaluate
from cifar100.training.memory_fit import MemoryFit
from cifar100.training.train_state import RunTotals

# A split's out-of-memory line from its name and the batch it ran out at.
FailedLine = Callable[[str, int], str]


class Scoring:
    """The held-out splits (`eval_sets`: name -> images, labels) and how the run scores them."""

    def __init__(
        self,
        accelerator: Accelerator,
        eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
        settings: EvalSettings,
        memory_fit: MemoryFit,
        ema: WeightAverage | None,
    ):
        self.accelerator, self.eval_sets, self.settings = accelerator, eval_sets, settings
        self.memory_fit, self.ema = memory_fit, ema

    def score(
        self, model: torch.nn.Module, row: dict[str, Any], totals: RunTotals, failed: FailedLine, batches: int | None
    ) -> None:
        """Add every split's loss, top-1 and top-5 to `row`, by `model` and the averaged weights (of the
        first `batches` evaluation batches of each split, when given); a smaller batch that had to be
        taken is kept in `totals` too."""
        size = None if batches is None else batches * self.settings.batch_size
        scored = {"": model}
        if self.ema is not None:
            self.ema.sync(self.accelerator)
            scored["ema_"] = self.ema.module
        for prefix, weights in scored.items():
            for split, (images, labels) in self.eval_sets.items():
                scores = self._score_split(weights, split, images[:size], labels[:size], totals, failed)
                row.update(
                    {
                        f"{prefix}{split}_loss": scores.loss,
                        f"{prefix}{split}_top1": scores.top1,
                        f"{prefix}{split}_top5": scores.top5,
                    }
                )

    def _score_split(
        self,
        model: torch.nn.Module,
        split: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        totals: RunTotals,
        failed: FailedLine,
    ) -> EvalResult:
        """One split's exact scores, at the evaluation batch the memory fitting set."""
        fit, auto = self.memory_fit, self.memory_fit.cfg.train.micro_batch == "auto"
        # Under auto the evaluation halved its batch down to one image before it failed.
        settings = dataclasses.replace(self.settings, batch_size=fit.eval_batch)
        with memory.out_of_memory_is_one_line(lambda: failed(split, 1 if auto else fit.eval_batch)):
            scores = evaluate(model, images, labels, self.accelerator, settings, smaller_on_oom=auto)
        if scores.batch_size < fit.eval_batch:  # the trial's size did not hold once training had run
            self.accelerator.print(
                f"evaluation batch {scores.batch_size} images per process: {fit.eval_batch} ran out of memory"
            )
            fit.eval_batch = totals.eval_batch = scores.batch_size
        return scores
