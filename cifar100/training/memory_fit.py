"""`train.micro_batch` as a component of the run: the trainer calls `fit` once, before the loop (and
before a budget's measurement, whose rate is that of the micro-batches the run trains in), and reads
`micro_batch` and `eval_batch` after. The trials and the out-of-memory lines are memory.py's."""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from accelerate import Accelerator
from torch import nn

from cifar100.config import Config
from cifar100.data.loader import epoch_batches
from cifar100.data.mixing import BatchMixer
from cifar100.errors import UserError
from cifar100.training import memory
from cifar100.training.ema import WeightAverage
from cifar100.training.engine import Engine
from cifar100.training.evaluation import EvalSettings
from cifar100.training.train_state import TrainState


class FittedRun(Protocol):
    """What the fitting uses of the run: its built parts and the state a resume brought."""

    model: nn.Module
    engine: Engine
    ema: WeightAverage | None
    loader: Any
    mixer: BatchMixer
    state: TrainState
    eval_settings: EvalSettings
    eval_sets: dict


class MemoryFit:
    """The micro-batch a run trains in (None: each process's whole batch at once) and the batch its
    evaluations run at, as `train.micro_batch` asks."""

    def __init__(self, cfg: Config, accelerator: Accelerator, batch: int):
        self.cfg, self.accelerator, self.batch = cfg, accelerator, batch  # batch: one process's per micro-step
        self.micro_batch: int | None = None
        self.eval_batch = cfg.data.eval_batch_size
        self.fitted = False

    def device_memory(self) -> str:
        """The memory the run may use, in words."""
        return memory.device_memory(self.accelerator.device)

    def fit(self, run: FittedRun) -> None:
        """Set the micro-batch `train.micro_batch` asks for: none, N images, or (auto) the largest
        that fits, found on every process by trying the real step on the real model and agreed as
        the smallest; a resume keeps the size its run found. Evaluations start at data.eval_batch_size
        (or the batch a resumed run found) and, under auto, halve it when it does not fit."""
        asked, totals, acc = self.cfg.train.micro_batch, run.state.totals, self.accelerator
        self.fitted = True
        self.eval_batch = totals.eval_batch or self.cfg.data.eval_batch_size
        if asked is None:
            self.micro_batch = None
            return
        if asked == "auto" and totals.micro_batch:
            size, how = totals.micro_batch, "kept from the run resumed"
        elif asked == "auto":
            found = self._search_micro_batch(run)
            if found is None:
                bf16 = "" if self.cfg.train.precision == "bf16" else ", or train.precision=bf16 where the device has it"
                raise UserError(
                    f"train.micro_batch=auto: not even one image's training step fits {self.device_memory()}; "
                    f"choose a smaller model.name{bf16}"
                )
            size, how = found, "the largest that fits, tried on every process"
        else:
            size, how = int(asked), "as train.micro_batch says"
        self.micro_batch = totals.micro_batch = min(size, self.batch)
        if asked == "auto" and not totals.eval_batch:
            self._fit_eval_batch(run)
        run.engine.micro_batch = self.micro_batch
        acc.print(
            f"train.micro_batch={asked}: {self.micro_batch} images per forward and backward ({how}), "
            f"{math.ceil(self.batch / self.micro_batch)} per step of {self.batch} images per process; "
            f"the global batch stays data.batch_size={self.cfg.data.batch_size}",
            flush=True,
        )

    def _search_micro_batch(self, run: FittedRun) -> int | None:
        """The largest micro-batch whose step fits on every process (None: not even one image's), tried
        on the pipeline's first batch, mixed as training mixes it, with its loader running, and with
        what the run holds beside the step (memory.held_beside) held; nothing of the run changes."""
        acc = self.accelerator
        module = acc.unwrap_model(run.model, keep_torch_compile=False)  # eager: no compile for a trial
        optimizer, channels_last = run.engine.optimizer, self.cfg.train.channels_last
        held = memory.held_beside(module, optimizer, acc.device, ema=run.ema is not None, processes=acc.num_processes)
        with memory.untouched(module):  # starting the loader draws from torch's generator
            batches = iter(epoch_batches(run.loader, 1, 0, acc))
            images, labels = next(batches)
            mixed = run.mixer(images, labels, np.random.default_rng([self.cfg.seed, 0, 0, acc.process_index]))

            def fits(size: int) -> bool:
                return memory.agreed(acc, memory.step_fits(module, optimizer, acc, size, mixed, channels_last, held))

            try:
                return memory.largest_fitting(self.batch, fits)
            finally:
                del batches, images, labels
                getattr(run.loader, "end", lambda: None)()  # Accelerate's loader left mid-epoch

    def _fit_eval_batch(self, run: FittedRun) -> None:
        """The evaluation batch: data.eval_batch_size, halved until an evaluation forward fits on
        every process (evaluation scores the same at any batch)."""
        acc, settings = self.accelerator, run.eval_settings
        module = acc.unwrap_model(run.model, keep_torch_compile=False)
        most = max(math.ceil(len(labels) / acc.num_processes) for _, labels in run.eval_sets.values())
        asked = min(self.eval_batch, most)  # a split never runs a batch larger than its shard

        optimizer = run.engine.optimizer
        # By the first evaluation the optimizer's state exists, and on a CPU a checkpoint's copy may be held.
        state = 0 if getattr(optimizer, "optimizer", optimizer).state else memory.optimizer_state_slots(optimizer)
        held = state * memory.parameter_bytes(module) + memory.held_beside(
            module, optimizer, acc.device, ema=run.ema is not None, processes=acc.num_processes
        )

        def fits(size: int) -> bool:
            ok = memory.eval_fits(module, acc, size, settings.channels_last, settings.tta_flip, held)
            return memory.agreed(acc, ok)

        found = memory.largest_halving(asked, fits)
        if found is None:
            raise UserError(f"train.micro_batch=auto: not even one image's evaluation fits {self.device_memory()}")
        if found < asked:
            self.eval_batch = run.state.totals.eval_batch = found
            acc.print(f"evaluation batch {found} images per process: data.eval_batch_size={asked} does not fit")
