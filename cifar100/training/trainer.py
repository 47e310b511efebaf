"""A training run from a config to a finished run folder, as one object whose methods read in order.

`Trainer(cfg)` sets up (Accelerator, data, model, optimizer, schedule, mixer: everything checked
before a folder exists); `restore()` picks the run folder and, on a resume, loads the train state;
`train()` runs the epochs (train, evaluate, log, checkpoint) and `finish()` writes the summary.
A signal or a non-finite loss ends the loop early, after a checkpoint or naming the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed

from cifar100.config import Config, to_dict, to_yaml
from cifar100.data import cifar as cifar_data
from cifar100.data.batched import DeviceLoader
from cifar100.data.loader import build_train_loader, epoch_batches
from cifar100.data.mixing import BatchMixer
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError
from cifar100.preemption import Preempted, StopFlag
from cifar100.runfolder import resume as resuming
from cifar100.runfolder import rundir
from cifar100.runfolder.checkpoint import CheckpointWriter
from cifar100.runfolder.tracking import (
    append_metrics,
    finish_tracking,
    log_wandb,
    plot_run,
    start_wandb,
    summarize,
    write_run_file,
)
from cifar100.training import budget, memory
from cifar100.training.compile_cache import compiled
from cifar100.training.ema import WeightAverage
from cifar100.training.engine import Engine, EpochResult, NonFiniteLoss, StepRules
from cifar100.training.eta import RunClock, too_long
from cifar100.training.evaluation import EvalSettings, evaluate
from cifar100.training.memory_fit import MemoryFit
from cifar100.training.models import build_model, count_parameters, flops_per_image, whiten_stem
from cifar100.training.optim import Schedule, build_optimizer
from cifar100.training.ranks import main_decides
from cifar100.training.runtime import (
    capped_workers,
    device_name,
    device_type,
    fresh_process_state,
    require_one_job,
    resolve_precision,
)
from cifar100.training.time_budget import TimeBudget
from cifar100.training.train_state import TrainState

WHITEN_IMAGES = 5000  # training images whose patches set a whitened stem (model.whiten): airbench's count


class _Paused(Exception):
    """train.pause_at_step reached mid-epoch, its checkpoint taken: the epoch loop ends here."""


def train(cfg: Config, counted_from: float | None = None) -> Path:
    """Train as `cfg` says; returns the run folder (the same path on every process). A budget counts
    from `counted_from` (a `time.perf_counter` value: a command line's first run passes its process's
    start), else from this call. The stop signals are this run's from the start to the end, however
    it ends: a stop while setting up ends it in one line too, with nothing left behind."""
    counted_from = time.perf_counter() if counted_from is None else counted_from
    # One process may train several runs (seeds, a sweep, a notebook): each gets it afresh.
    with fresh_process_state(), StopFlag().installed() as stop:
        trainer: Trainer | None = None
        # Out of memory anywhere (building, loading, fitting, checkpointing, finishing) is one line too;
        # the training step and the evaluations say more, from their own guards inside.
        with memory.out_of_memory_is_one_line(lambda: trainer.out_of_memory() if trainer else _setting_up_failed(cfg)):
            trainer = Trainer(cfg, stop, counted_from)
            trainer.restore()
            trainer.train()
            return trainer.run_dir if trainer.paused else trainer.finish()


def _setting_up_failed(cfg: Config) -> str:
    """The out-of-memory line of a run whose data, model or optimizer did not fit."""
    kept = "none yet" if cfg.resume == "none" else "as it was (this start wrote nothing)"
    where = memory.device_memory(torch.device(device_type()))
    fix = memory.FIX_ELSEWHERE
    return f"while setting up the data, model and optimizer on {where}: {fix}. Last good checkpoint: {kept}"


class Trainer:
    """One run: built from the config, restored from a checkpoint when resuming, trained, finished."""

    def __init__(self, cfg: Config, stop: StopFlag, counted_from: float):
        self.cfg, self.started, self.stop = cfg, time.perf_counter(), stop
        self.doing = "setting up the data, model and optimizer"  # what an out of memory interrupted
        if cfg.train.budget == "auto" and not os.environ.get("SLURM_JOB_ID"):
            raise UserError(
                "train.budget=auto plans to a Slurm job's time limit, and this is not a Slurm job "
                "(no SLURM_JOB_ID): give a duration instead, e.g. train.budget=2h"
            )
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device_type = device_type()
        # Every training batch has one shape, so cuDNN's autotuner (timed once per shape) beats its heuristics.
        torch.backends.cudnn.benchmark = self.device_type == "cuda"
        self.precision = resolve_precision(cfg.train.precision, self.device_type)
        self.accelerator = acc = Accelerator(
            mixed_precision=self.precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with="wandb" if cfg.log.wandb.mode != "disabled" else None,
            # non_blocking: copies from the pinned batches never make the host wait for the GPU.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
        )
        require_one_job(os.environ.get("WORLD_SIZE"), os.environ.get("RANK"), acc.num_processes)
        self.time_budget = TimeBudget(cfg, acc, counted_from)
        set_seed(cfg.seed)
        if acc.is_main_process:
            print(to_yaml(cfg), flush=True)
        build_model(cfg.model, cifar_data.NUM_CLASSES, device="meta")  # a model that cannot run: before the data
        self._build_data()
        self.stop_if_asked()
        self._build_model()
        self.stop_if_asked()

    def _build_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        with acc.main_process_first():
            dataset = cifar_data.load(cfg.data.root, cfg.data.download)
        self.splits = splits = cifar_data.select_splits(dataset, cfg.data, cfg.seed)
        self.batch = cifar_data.per_process_batch(cfg.data.batch_size, acc.num_processes, cfg.train.grad_accum)
        self.memory_fit = MemoryFit(cfg, acc, self.batch)
        data_cfg = capped_workers(cfg.data, acc.print if acc.is_main_process else None)
        self.train_images = dataset.train.images[splits.train]
        self.loader = build_train_loader(
            self.train_images,
            dataset.train.labels[splits.train],
            self.batch,
            data_cfg,
            cfg.augment,
            seed=cfg.seed,
            grad_accum=cfg.train.grad_accum,
            accelerator=acc,
        )
        # Indexed once, not every epoch; on the device already when the training data lives there.
        where = acc.device if cfg.data.pipeline == "device" else torch.device("cpu")
        self.eval_sets = {
            "test": (dataset.test.images[splits.test].to(where), dataset.test.labels[splits.test].to(where))
        }
        if len(splits.val):
            self.eval_sets = {
                "val": (dataset.train.images[splits.val].to(where), dataset.train.labels[splits.val].to(where)),
                **self.eval_sets,
            }
        self.selected = "val" if len(splits.val) else "test"  # the split that picks the best epoch
        # ...scored by the weights `train.ema.select` names: the model's, or the averaged ones.
        self.score_key = f"{'ema_' if cfg.train.ema.select == 'ema' else ''}{self.selected}_top1"

    def _build_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        model = build_model(cfg.model, cifar_data.NUM_CLASSES)
        if cfg.model.whiten:  # from the same images on every process; a resume then loads the trained weights
            whiten_stem(model, normalize_batch(self.train_images[:WHITEN_IMAGES], cfg.augment.mean, cfg.augment.std))
        self.parameters, self.flops = count_parameters(model), flops_per_image(model)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(acc.device)
        # Of the plain module, before any wrapper: DDP's and torch.compile's share its parameters.
        if cfg.train.ema.select == "ema" and not cfg.train.ema.enabled:
            raise UserError(
                "train.ema.select=ema picks the best epoch by the averaged weights: set train.ema.enabled=true"
            )
        self.ema = WeightAverage(model, cfg.train.ema) if cfg.train.ema.enabled else None
        optimizer = build_optimizer(model, cfg.optim)
        if isinstance(self.loader, DeviceLoader):
            model, optimizer = acc.prepare(model, optimizer)
        else:
            model, optimizer, self.loader = acc.prepare(model, optimizer, self.loader)
        # Checkpoints hold the uncompiled module's weights, so any run (compiled or not) can load them.
        self.model: torch.nn.Module = compiled(model) if cfg.train.compile else model
        self.steps_per_epoch = math.ceil(len(self.loader) / cfg.train.grad_accum)
        schedule = Schedule(optimizer, cfg.optim, cfg.sched, self.steps_per_epoch, cfg.train.epochs, cfg.train.steps)
        self.mixer = mixer = BatchMixer.from_config(cfg.augment, cifar_data.NUM_CLASSES)
        self.engine = Engine(self.model, optimizer, schedule, mixer, acc, StepRules.from_config(cfg), self.ema)
        self.eval_settings = EvalSettings.from_config(cfg)
        self.state = TrainState(model, optimizer, schedule, acc, self.ema)

    def restore(self) -> None:
        """Pick the run folder (a new one, or the one a resume continues or forks) and load its checkpoint.

        Only now, with every part built and checked, is a folder made: a bad value leaves none. The
        main process picks the folder and checkpoint and locks the folder; every process then loads
        the same checkpoint, and only once it has loaded is any file of a run folder changed.
        """
        cfg, acc, main = self.cfg, self.accelerator, self.accelerator.is_main_process
        self.doing = "loading the checkpoint and opening the run folder"
        if self.time_budget.wanted and self.time_budget.starts_afresh():
            self._fit_and_plan()  # before any folder exists: a budget too short for one step leaves none
        found = resuming.start_point(cfg.resume, cfg.log.dir, cfg.name) if main else None
        located = main_decides(acc, lambda: found.checkpoint and str(found.checkpoint) if found else None)
        ckpt_path = Path(located) if located else None
        self.config_dict = to_dict(cfg)
        best_score, saved_plan = self._load(ckpt_path, found) if ckpt_path else (-1.0, None)
        if not ckpt_path and self.time_budget.wanted and self.time_budget.plan is None:
            self._fit_and_plan()  # resume=auto found no checkpoint that loads
        adopted = rundir.adopt(found, cfg.log.dir, cfg.name, self.state.totals.epochs_done) if found else None
        run_dir, self.rows = main_decides(acc, lambda: (str(adopted.run_dir), adopted.rows) if adopted else ("", []))
        self.run_dir = Path(run_dir)  # the main process always has a start point, and so a folder
        self.writer = self._open_writer(ckpt_path, best_score)
        self.wall_before = self.state.totals.wall_seconds
        done = self.state.totals.epochs_done
        self.clock = RunClock(
            self.state.schedule.total_steps, self.epochs, done_steps=self.state.schedule.step_count, done_epochs=done
        )
        self.time_budget.restored(saved_plan, self.wall_before, resumed=ckpt_path is not None)
        # The projection warning: once, by the main process; a budget run's length is its budget.
        self.warned = not acc.is_main_process or self.time_budget.plan is not None
        if found and adopted:  # on the main process
            self._announce(found, adopted, ckpt_path)
        if not self.memory_fit.fitted:  # set once, before a budget's measurement where there is one
            self._fit_memory()

    def _fit_and_plan(self) -> None:
        """Fit the micro-batch, then plan the budget: the rate to measure is that of the micro-batches
        the run will train in."""
        self._fit_memory()
        self.stop_if_asked()
        self._plan_budget()

    def _load(self, ckpt_path: Path, found: rundir.Located | None) -> tuple[float, dict | None]:
        """Load the checkpoint a resume starts from: its best score so far and the budget plan it holds."""
        cfg = self.cfg
        snap = resuming.load(ckpt_path, self.config_dict, found.read if found else None)
        self.state.load_state_dict(snap, ckpt_path)
        if not snap.meta.get("plan"):  # the config's length: a WSD run may change it (resume.LENGTH_KEYS)
            steps = cfg.train.steps or self.steps_per_epoch * cfg.train.epochs
            self.state.schedule.lay_over(steps, planned=bool(cfg.train.steps))
        return snap.meta.get("best_score", snap.meta["totals"].get("best_top1", -1.0)), snap.meta.get("plan")

    def _open_writer(self, ckpt_path: Path | None, best_score: float) -> CheckpointWriter:
        """The run folder's checkpoint writer, its last good checkpoint the one this start loaded."""
        ckpt_dir = self.run_dir / "checkpoints"
        # No best weights on disk (a fork from before its source's best epoch): any score beats none.
        return CheckpointWriter(
            ckpt_dir,
            self.cfg.train.keep_last,
            ckpt_path and ckpt_dir / ckpt_path.name,
            best_score if (ckpt_dir / "best").exists() else -1.0,
            select=self.cfg.train.ema.select,
        )

    def _announce(self, found: rundir.Located, adopted: rundir.Adopted, ckpt_path: Path | None) -> None:
        """On the main process, once the folder is this run's: its config.yaml, W&B and the header line."""
        if adopted.forked:
            self.state.totals.wandb_id = None  # a fork is a W&B run of its own
        config, text = self.run_dir / "config.yaml", to_yaml(self.cfg)
        if not config.is_file() or config.read_text() != text:
            write_run_file(config, text)
        wandb = self.cfg.log.wandb
        self.state.totals.wandb_id = start_wandb(
            self.accelerator,
            wandb.project,
            wandb.entity,
            wandb.mode,
            Path(wandb.dir) if wandb.dir else self.run_dir,
            self.run_dir.name,
            self.config_dict,
            run_id=self.state.totals.wandb_id,
        )
        fork = f", a fork of {found.fork_of}" if adopted.forked else ""
        self._print_header(
            f"resuming {ckpt_path} at epoch {self.state.epoch}, batch {self.state.progress.step}{fork}"
            if ckpt_path
            else "new run"
        )

    def _fit_memory(self) -> None:
        doing, self.doing = self.doing, "fitting the micro-batch"
        self.memory_fit.fit(self)
        self.doing = doing

    def _memory(self) -> str:
        return memory.device_memory(self.accelerator.device)

    def out_of_memory(self) -> str:
        """The out-of-memory line of anything but a training step or an evaluation (whose own say more):
        what the run was doing, the memory, the fix and the last good checkpoint."""
        writer: CheckpointWriter | None = getattr(self, "writer", None)  # made once the folder is open
        if writer is None:
            last = "none yet" if self.cfg.resume == "none" else "as it was (this start wrote nothing)"
        else:
            with contextlib.suppress(Exception):  # a write that failed leaves the one before it the last good
                writer.wait()
            last = str(writer.last_good or "none yet")
        return f"while {self.doing} on {self._memory()}: {memory.FIX_ELSEWHERE}. Last good checkpoint: {last}"

    def _print_header(self, where: str) -> None:
        s, acc = self.splits, self.accelerator
        acc.print(
            f"run folder {self.run_dir} ({where}) | model {self.cfg.model.name}: {self.parameters / 1e6:.2f} M "
            f"parameters, {self.flops / 1e9:.3f} GFLOP per image | {len(s.train)} train / {len(s.val)} val / "
            f"{len(s.test)} test images | {acc.num_processes} process(es) on {device_name(self.device_type)}, "
            f"precision {self.precision}, {self.batch} images per process per step",
            flush=True,
        )

    @property
    def epochs(self) -> int:
        """The run's epochs: train.epochs, or those of its planned steps (the last may be partial)."""
        return budget.epochs_of(self.state.schedule.total_steps, self.steps_per_epoch)

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any process (every process asks at the same point)."""
        acc = self.accelerator
        return acc.reduce(torch.tensor(float(bool(self.stop)), device=acc.device), reduction="sum").item() > 0

    def stop_if_asked(self) -> None:
        """End a start that a stop reached before training: no folder, checkpoint or scratch is left."""
        if self._stop_requested():
            raise Preempted(
                f"stopped by {self.stop.name or 'a signal on another rank'} while setting up, before "
                "this start trained or wrote anything",
                self.stop.signal,
            )

    def _plan_budget(self) -> None:
        doing, self.doing = self.doing, "measuring the run for its budget"
        self.time_budget.plan_run(self)
        self.doing = doing

    def train(self) -> None:
        """Train the remaining epochs; raise Preempted after a stop's checkpoint."""
        self.paused = False
        while self.state.epoch <= self.epochs:
            self.doing = f"training epoch {self.state.epoch}"
            try:
                result = self.train_epoch()
            except _Paused:
                break
            if result is None:
                self.checkpoint()
                self._halt(f"at epoch {self.state.epoch}, batch {self.state.progress.step}")
            ended = time.perf_counter()
            row = self.evaluate(result)
            self.state.end_epoch()
            # The row goes to disk before the checkpoint does: a checkpoint never gets ahead of the
            # metrics, and the row can say how long the checkpoint held training up.
            self.checkpoint(score=row[self.score_key], before_write=partial(self._log_held, row))
            self.time_budget.epoch_ended(time.perf_counter() - ended)
            if self._stop_requested() and self.state.epoch <= self.epochs:
                self._halt(f"after epoch {self.state.epoch - 1}")
            if self._pausing() and self.state.epoch <= self.epochs:
                self.paused = True  # at an epoch's end: its checkpoint is the pause's
                break
        self.flush()
        if self.paused:
            self.accelerator.print(
                f"paused at step {self.state.schedule.step_count} (train.pause_at_step): "
                f"{self.run_dir / 'checkpoints' / 'last'}; resume=auto goes on exactly",
                flush=True,
            )

    def train_epoch(self) -> EpochResult | None:
        """One epoch (or the rest of one, on a resume); None when a stop was requested."""
        cfg, state = self.cfg, self.state
        self.lr = state.schedule.lr_at(state.schedule.step_count - state.progress.step // cfg.train.grad_accum)
        batches = epoch_batches(self.loader, state.epoch, state.progress.step, self.accelerator)
        every = cfg.train.checkpoint_every_steps
        self.clock.start_epoch()

        def after_step(progress) -> None:
            self.clock.step(state.schedule.step_count)
            self._warn_if_too_long()
            self.time_budget.after_step(state.schedule, self.clock, self.steps_per_epoch)
            if every and state.schedule.step_count % every == 0 and progress.step < len(self.loader):
                self.checkpoint()
            if self._pausing() and progress.step < len(self.loader):  # mid-epoch: this exact position
                self.checkpoint()
                self.paused = True
                raise _Paused

        try:
            with memory.out_of_memory_is_one_line(self._train_step_failed):
                return self.engine.train_epoch(
                    state.epoch,
                    batches,
                    state.progress,
                    stop_requested=self.stop.__bool__,
                    after_step=after_step,
                    run_left=self.clock.left_text,
                )
        except NonFiniteLoss as err:
            self.flush()
            raise UserError(
                f"{err}: stopping. Last good checkpoint: {self.writer.last_good or 'none yet'}; resume "
                "with resume=auto after lowering optim.lr or setting train.clip_grad, or allow skips "
                "with train.max_bad_steps=N"
            ) from None

    def _pausing(self) -> bool:
        """Whether `train.pause_at_step` is the step just taken (and not the run's last)."""
        pause, schedule = self.cfg.train.pause_at_step, self.state.schedule
        return 0 < pause == schedule.step_count < schedule.total_steps

    def _train_step_failed(self) -> str:
        """The out-of-memory line of a training step: where, its batch, the memory, the fix."""
        self.writer.wait()  # the last good checkpoint on disk before this process ends
        micro = self.memory_fit.micro_batch
        pieces = f" in micro-batches of {micro}" if micro and micro < self.batch else ""
        return (
            f"in the training step (epoch {self.state.epoch}, batch {self.state.progress.step}) with "
            f"{self.batch} images per process{pieces} on {self._memory()}: "
            f"{memory.fix_for_train(self.batch, micro, self.cfg.train.grad_accum, self.cfg.train.micro_batch)}. "
            f"Last good checkpoint: {self.writer.last_good or 'none yet'}"
        )

    def _score_split(self, model: torch.nn.Module, split: str, images: torch.Tensor, labels: torch.Tensor):
        """One split's exact scores, at the evaluation batch the memory fitting set."""

        fit = self.memory_fit
        auto = self.cfg.train.micro_batch == "auto"

        def failed() -> str:
            self.writer.wait()
            batch = 1 if auto else fit.eval_batch  # under auto the evaluation halved its batch down to one image
            return (
                f"in the evaluation of {split} (epoch {self.state.epoch}) with batches of {batch} "
                f"images per process on {self._memory()}: {memory.fix_for_eval(batch, auto)}. "
                f"Last good checkpoint: {self.writer.last_good or 'none yet'}"
            )

        settings = dataclasses.replace(self.eval_settings, batch_size=fit.eval_batch)
        with memory.out_of_memory_is_one_line(failed):
            scores = evaluate(model, images, labels, self.accelerator, settings, smaller_on_oom=auto)
        if scores.batch_size < fit.eval_batch:  # the trial's size did not hold once training had run
            self.accelerator.print(
                f"evaluation batch {scores.batch_size} images per process: {fit.eval_batch} ran out of memory"
            )
            fit.eval_batch = self.state.totals.eval_batch = scores.batch_size
        return scores

    def _warn_if_too_long(self) -> None:
        if self.warned:
            return
        elapsed = self.wall_before + time.perf_counter() - self.started
        message = too_long(self.clock, elapsed, self.cfg.log.warn_hours, self.device_type)
        if message:
            warnings.warn(message, stacklevel=1)
            self.warned = True

    def evaluate(self, result: EpochResult) -> dict:
        """The epoch's metrics row: training figures, then every held-out split scored exactly, by
        the model and (as `ema_<split>_*`) by the averaged weights."""
        began = time.perf_counter()
        row = {"epoch": self.state.epoch, "lr": self.lr, "train_loss": result.loss, "train_top1": result.top1}
        self.score(row)
        row.update(
            epoch_seconds=result.seconds,
            images_per_second=result.images / result.seconds,
            eval_seconds=time.perf_counter() - began,
        )
        self.clock.evaluated(row["eval_seconds"])
        self.state.schedule.epoch_end(row[f"{self.selected}_loss"])
        totals = self.state.totals
        totals.train_images += result.images
        totals.train_seconds += result.seconds
        totals.images_per_rank = [a + b for a, b in zip(totals.images_per_rank, result.images_per_rank)]
        return row

    def score(self, row: dict, batches: int | None = None) -> None:
        """Add every held-out split's loss, top-1 and top-5 to `row`, by the model and the averaged weights
        (of the first `batches` evaluation batches of each split, when given)."""
        size = None if batches is None else batches * self.eval_settings.batch_size
        scored = {"": self.model}
        if self.ema is not None:
            self.ema.sync(self.accelerator)
            scored["ema_"] = self.ema.module
        for prefix, model in scored.items():
            for split, (images, labels) in self.eval_sets.items():
                scores = self._score_split(model, split, images[:size], labels[:size])
                row.update(
                    {
                        f"{prefix}{split}_loss": scores.loss,
                        f"{prefix}{split}_top1": scores.top1,
                        f"{prefix}{split}_top5": scores.top5,
                    }
                )

    def _log_held(self, row: dict, held: float) -> None:
        self.log({**row, "checkpoint_seconds": held})

    def log(self, row: dict) -> None:
        """metrics.jsonl, the plots, W&B and one printed line (main process); every rank keeps the row."""
        self.rows.append(row)
        acc = self.accelerator
        if not acc.is_main_process:
            return
        append_metrics(self.run_dir / "metrics.jsonl", row)
        log_wandb(acc, row, plot_run(self.rows, self.run_dir, self.run_dir.name))
        val = f"val top1 {row['val_top1']:.2%} | " if "val_top1" in row else ""
        ema = f" | EMA test top1 {row['ema_test_top1']:.2%}" if "ema_test_top1" in row else ""
        left = self.clock.left_text()
        left = f" | run left ~{left}" if left and row["epoch"] < self.epochs else ""
        acc.print(
            f"epoch {row['epoch']}/{self.epochs} | lr {row['lr']:.3g} | train loss "
            f"{row['train_loss']:.4f} top1 {row['train_top1']:.2%} | {val}test loss {row['test_loss']:.4f} "
            f"top1 {row['test_top1']:.2%} top5 {row['test_top5']:.2%}{ema} | {row['epoch_seconds']:.1f} s, "
            f"{row['images_per_second']:.0f} img/s{left}",
            flush=True,
        )

    def checkpoint(self, score: float | None = None, before_write: Callable[[float], None] | None = None) -> None:
        """Checkpoint this exact position (every rank calls it): the main process copies it to host
        memory, with the epoch's `score` when it may be the best so far, runs `before_write(seconds
        training was held up)`, then lets the background writer write it."""
        began, doing = time.perf_counter(), self.doing
        self.doing = f"checkpointing at epoch {self.state.epoch}, batch {self.state.progress.step}"
        self.state.totals.wall_seconds = self.wall_before + began - self.started
        snap = self.state.state_dict()
        if self.accelerator.is_main_process:
            snap.meta["config"] = self.config_dict
            if self.time_budget.plan is not None:
                snap.meta["plan"] = self.time_budget.plan.to_dict()
            self.writer.copy(self.state.tag, snap, score)
        if before_write is not None:
            before_write(time.perf_counter() - began)
        if self.accelerator.is_main_process:
            self.writer.start()
        self.accelerator.wait_for_everyone()
        self.doing = doing

    def flush(self) -> None:
        """Every checkpoint on disk before any rank goes on: a rank that exits first (a stop, an
        error) makes the launcher end the main process, write or not."""
        self.writer.wait()
        self.accelerator.wait_for_everyone()

    def _halt(self, where: str) -> NoReturn:
        self.flush()
        raise Preempted(
            f"stopped by {self.stop.name or 'a signal on another rank'} {where}; "
            f"checkpoint {self.run_dir / 'checkpoints' / 'last'}",
            self.stop.signal,
        )

    def finish(self) -> Path:
        """summary.json, the closing line and the end of tracking; returns the run folder."""
        totals, acc = self.state.totals, self.accelerator
        self.doing = "writing the summary"
        summary = summarize(
            self.rows,
            recipe=self.cfg.recipe or self.cfg.name,
            name=self.run_dir.name,
            seed=self.cfg.seed,
            best_selected_on=self.selected,
            wall_seconds=self.wall_before + time.perf_counter() - self.started,
            images_per_second=totals.train_images / max(totals.train_seconds, 1e-9),
            world_size=acc.num_processes,
            images_per_rank=totals.images_per_rank,
            precision=self.precision,
            device=device_name(self.device_type),
            parameters=self.parameters,
            flops_per_image=self.flops,
            best_weights=self.cfg.train.ema.select,
            **self.time_budget.summary(self.state.schedule),
            micro_batch=self.memory_fit.micro_batch or self.batch,
            eval_batch_size=self.memory_fit.eval_batch,
        )
        if acc.is_main_process:
            write_run_file(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            best = summary[f"best_{self.selected}_top1"]
            acc.print(
                f"done in {summary['wall_seconds']:.0f} s: final test top1 {summary['final_test_top1']:.2%}, "
                f"best {self.selected} top1 {best:.2%} | {self.run_dir}",
                flush=True,
            )
        finish_tracking(acc, self.run_dir, summary)
        return self.run_dir
