"""A training run from a config to a finished run folder, as one object whose methods read in order.

`Trainer(cfg)` builds (Accelerator, data, then the step's parts from step_parts.py: everything checked
before a folder exists); `restore()` picks the run folder and, on a resume, loads the train state;
`train()` runs the epochs (train, score, log, checkpoint) and `finish()` writes the summary. What
lives beside the loop is a component in a module of its own, called through a few named methods: the
time budget (time_budget.py), the micro-batch (memory_fit.py), stops and pauses (stops.py), the held-out scores
(scoring.py), the files and lines of the run (run_record.py), the out-of-memory lines (oom_lines.py).
A signal or a non-finite loss ends the loop early, after a checkpoint or naming the last good one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch
from accelerate.utils import set_seed

from cifar100.config import Config, to_dict, to_yaml
from cifar100.data import cifar as cifar_data
from cifar100.data.batched import DeviceLoader
from cifar100.data.loader import build_train_loader, epoch_batches
from cifar100.errors import UserError
from cifar100.preemption import StopFlag
from cifar100.runfolder import resume as resuming
from cifar100.runfolder import rundir
from cifar100.runfolder.checkpoint import CheckpointWriter
from cifar100.runfolder.tracking import summarize
from cifar100.training import budget, memory, oom_lines
from cifar100.training.engine import EpochResult, NonFiniteLoss
from cifar100.training.eta import LengthWarning, RunClock
from cifar100.training.evaluation import EvalSettings
from cifar100.training.memory_fit import MemoryFit
from cifar100.training.models import build_model
from cifar100.training.ranks import main_decides
from cifar100.training.run_record import OpenRun, RunRecord
from cifar100.training.runtime import (
    capped_workers,
    device_name,
    device_type,
    fresh_process_state,
    make_accelerator,
    resolve_precision,
)
from cifar100.training.scoring import Scoring
from cifar100.training.step_parts import build_step
from cifar100.training.stops import Paused, Stops
from cifar100.training.time_budget import TimeBudget, refuse_auto_outside_slurm
from cifar100.training.train_state import TrainState


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
        with memory.out_of_memory_is_one_line(
            lambda: trainer.out_of_memory() if trainer else oom_lines.while_setting_up(cfg.resume)
        ):
            trainer = Trainer(cfg, stop, counted_from)
            trainer.restore()
            trainer.train()
            return trainer.run_dir if trainer.paused else trainer.finish()


class Trainer:
    """One run: built from the config, restored from a checkpoint when resuming, trained, finished."""

    def __init__(self, cfg: Config, stop: StopFlag, counted_from: float):
        self.cfg, self.started, self.stop = cfg, time.perf_counter(), stop
        self.doing = "setting up the data, model and optimizer"  # what an out of memory interrupted
        self.paused = False  # whether train() ended at train.pause_at_step, its checkpoint taken
        self.config_dict = to_dict(cfg)  # as checkpoints and config.yaml hold it
        refuse_auto_outside_slurm(cfg)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device_type = device_type()
        # Every training batch has one shape, so cuDNN's autotuner (timed once per shape) beats its heuristics.
        torch.backends.cudnn.benchmark = self.device_type == "cuda"
        self.precision = resolve_precision(cfg.train.precision, self.device_type)
        self.accelerator = acc = make_accelerator(cfg, self.precision)
        self.stops = Stops(acc, stop, cfg.train.pause_at_step)
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
        loader = build_train_loader(
            self.train_images,
            dataset.train.labels[splits.train],
            self.batch,
            data_cfg,
            cfg.augment,
            seed=cfg.seed,
            grad_accum=cfg.train.grad_accum,
            accelerator=acc,
        )
        # Accelerate shards (DDP) and seeds the reference pipeline's loader; the device pipeline does its own.
        self.loader = loader if isinstance(loader, DeviceLoader) else acc.prepare(loader)
        # Indexed once, not every epoch; on the device already when the training data lives there.
        where = acc.device if cfg.data.pipeline == "device" else torch.device("cpu")
        self.eval_sets = cifar_data.held_out(dataset, splits, where)
        self.selected = "val" if len(splits.val) else "test"  # the split that picks the best epoch
        # ...scored by the weights `train.ema.select` names: the model's, or the averaged ones.
        self.score_key = f"{'ema_' if cfg.train.ema.select == 'ema' else ''}{self.selected}_top1"

    def _build_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.steps_per_epoch = math.ceil(len(self.loader) / cfg.train.grad_accum)
        parts = build_step(cfg, acc, self.train_images, self.steps_per_epoch)
        self.model, self.mixer, self.engine, self.ema = parts.model, parts.mixer, parts.engine, parts.ema
        self.parameter_count, self.flops_per_image = parts.parameter_count, parts.flops_per_image
        self.eval_settings = EvalSettings.from_config(cfg)
        self.scoring = Scoring(acc, self.eval_sets, self.eval_settings, self.memory_fit, self.ema)
        self.state = TrainState(parts.prepared, parts.optimizer, parts.schedule, acc, self.ema)

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
        best_score, saved_plan = self._load(ckpt_path, found) if ckpt_path else (-1.0, None)
        if not ckpt_path and self.time_budget.wanted and self.time_budget.plan is None:
            self._fit_and_plan()  # resume=auto found no checkpoint that loads
        adopted = rundir.adopt(found, cfg.log.dir, cfg.name, self.state.totals.epochs_done) if found else None
        run_dir, rows = main_decides(acc, lambda: (str(adopted.run_dir), adopted.rows) if adopted else ("", []))
        totals, schedule = self.state.totals, self.state.schedule
        self.time_budget.restored(saved_plan, totals.wall_seconds, resumed=ckpt_path is not None)
        quiet = not main or self.time_budget.plan is not None  # a budget's plan says the length instead
        # The main process always has a start point, and so a folder.
        self.run = OpenRun(
            RunRecord(acc, Path(run_dir), rows),
            CheckpointWriter.for_run(Path(run_dir), cfg.train.keep_last, ckpt_path, best_score, cfg.train.ema.select),
            RunClock(schedule.total_steps, self.epochs, done_steps=schedule.step_count, done_epochs=totals.epochs_done),
            LengthWarning(cfg.log.warn_hours, self.device_type, given=quiet),
            wall_before=totals.wall_seconds,
        )
        if found and adopted:  # on the main process
            self._announce(found, adopted, ckpt_path)
        if not self.memory_fit.fitted:  # set once, before a budget's measurement where there is one
            with self._doing("fitting the micro-batch"):
                self.memory_fit.fit(self)

    def _fit_and_plan(self) -> None:
        """Fit the micro-batch, then plan the budget: the rate to measure is that of the micro-batches
        the run will train in."""
        with self._doing("fitting the micro-batch"):
            self.memory_fit.fit(self)
        self.stop_if_asked()
        with self._doing("measuring the run for its budget"):
            self.time_budget.plan_run(self)

    def _load(self, ckpt_path: Path, found: rundir.Located | None) -> tuple[float, dict | None]:
        """Load the checkpoint a resume starts from: its best score so far and the budget plan it holds."""
        cfg = self.cfg
        snap = resuming.load(ckpt_path, self.config_dict, found.read if found else None)
        self.state.load_state_dict(snap, ckpt_path)
        if not snap.meta.get("plan"):  # the config's length: a WSD run may change it (resume.LENGTH_KEYS)
            steps = cfg.train.steps or self.steps_per_epoch * cfg.train.epochs
            self.state.schedule.lay_over(steps, planned=bool(cfg.train.steps))
        return snap.meta.get("best_score", -1.0), snap.meta.get("plan")

    def _announce(self, found: rundir.Located, adopted: rundir.Adopted, ckpt_path: Path | None) -> None:
        """On the main process, once the folder is this run's: its config.yaml, W&B and the header line."""
        totals, s, acc = self.state.totals, self.splits, self.accelerator
        if adopted.forked:
            totals.wandb_id = None  # a fork is a W&B run of its own
        totals.wandb_id = self.run.record.open(self.cfg, self.config_dict, totals.wandb_id)
        fork = f", a fork of {found.fork_of}" if adopted.forked else ""
        where = f"resuming {ckpt_path} at epoch {self.state.epoch}, batch {self.state.progress.step}{fork}"
        acc.print(
            f"run folder {self.run_dir} ({where if ckpt_path else 'new run'}) | model {self.cfg.model.name}: "
            f"{self.parameter_count / 1e6:.2f} M parameters, {self.flops_per_image / 1e9:.3f} GFLOP per image | "
            f"{len(s.train)} train / {len(s.val)} val / {len(s.test)} test images | {acc.num_processes} "
            f"process(es) on {device_name(self.device_type)}, precision {self.precision}, {self.batch} images "
            "per process per step",
            flush=True,
        )

    @contextlib.contextmanager
    def _doing(self, what: str) -> Iterator[None]:
        """Say what the run is doing, for an out of memory's line, while the block runs (an error
        inside leaves it said)."""
        doing, self.doing = self.doing, what
        yield
        self.doing = doing

    def out_of_memory(self) -> str:
        """The out-of-memory line of anything but a training step or an evaluation (whose own say more)."""
        run: OpenRun | None = getattr(self, "run", None)  # made once the folder is open
        last_good = oom_lines.last_good(run.writer if run else None, self.cfg.resume)
        return oom_lines.while_doing(self.doing, self.accelerator.device, last_good)

    @property
    def run_dir(self) -> Path:
        """The run folder restore() opened."""
        return self.run.record.run_dir

    @property
    def epochs(self) -> int:
        """The run's epochs: train.epochs, or those of its planned steps (the last may be partial)."""
        return budget.epochs_of(self.state.schedule.total_steps, self.steps_per_epoch)

    def stop_if_asked(self) -> None:
        """End a start that a stop reached before training: no folder, checkpoint or scratch is left."""
        self.stops.while_setting_up()

    def train(self) -> None:
        """Train the remaining epochs; raise Preempted after a stop's checkpoint."""
        while self.state.epoch <= self.epochs:
            self.doing = f"training epoch {self.state.epoch}"
            try:
                result = self.train_epoch()
            except Paused:
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
            if self.stops.requested() and self.state.epoch <= self.epochs:
                self._halt(f"after epoch {self.state.epoch - 1}")
            if self.stops.pausing(self.state.schedule) and self.state.epoch <= self.epochs:
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
        batches = epoch_batches(self.loader, state.epoch, state.progress.step, self.accelerator)
        every = cfg.train.checkpoint_every_steps
        self.run.clock.start_epoch()

        def after_step(progress) -> None:
            self.run.clock.step(state.schedule.step_count)
            self.run.length_warning.check(self.run.clock, self.run.wall_before + time.perf_counter() - self.started)
            self.time_budget.after_step(state.schedule, self.run.clock, self.steps_per_epoch)
            if every and state.schedule.step_count % every == 0 and progress.step < len(self.loader):
                self.checkpoint()
            if self.stops.pausing(state.schedule) and progress.step < len(self.loader):  # mid-epoch: here exactly
                self.checkpoint()
                self.paused = True
                raise Paused

        try:
            with memory.out_of_memory_is_one_line(self._train_step_failed):
                return self.engine.train_epoch(
                    state.epoch,
                    batches,
                    state.progress,
                    stop_requested=self.stop.__bool__,
                    after_step=after_step,
                    run_left=self.run.clock.left_text,
                )
        except NonFiniteLoss as err:
            self.flush()
            raise UserError(
                f"{err}: stopping. Last good checkpoint: {self.run.writer.last_good or 'none yet'}; resume "
                "with resume=auto after lowering optim.lr or setting train.clip_grad, or allow skips "
                "with train.max_bad_steps=N"
            ) from None

    def _train_step_failed(self) -> str:
        """The out-of-memory line of a training step: where, its batch, the memory, the fix."""
        self.run.writer.wait()  # the last good checkpoint on disk before this process ends
        where = f"epoch {self.state.epoch}, batch {self.state.progress.step}"
        micro, last = self.memory_fit.micro_batch, str(self.run.writer.last_good or "none yet")
        return oom_lines.in_train_step(where, self.batch, micro, self.cfg.train, self.accelerator.device, last)

    def _evaluation_failed(self, split: str, batch: int) -> str:
        """The out-of-memory line of an evaluation: which, its batch, the memory, the fix."""
        self.run.writer.wait()
        where, auto = f"{split} (epoch {self.state.epoch})", self.cfg.train.micro_batch == "auto"
        last = str(self.run.writer.last_good or "none yet")
        return oom_lines.in_evaluation(where, batch, auto, self.accelerator.device, last)

    def evaluate(self, result: EpochResult) -> dict:
        """The epoch's metrics row: training figures, then every held-out split scored exactly, by
        the model and (as `ema_<split>_*`) by the averaged weights."""
        began = time.perf_counter()
        row = {"epoch": self.state.epoch, "lr": result.lr, "train_loss": result.loss, "train_top1": result.top1}
        self.score(row)
        row.update(
            epoch_seconds=result.seconds,
            images_per_second=result.images / result.seconds,
            eval_seconds=time.perf_counter() - began,
        )
        self.run.clock.evaluated(row["eval_seconds"])
        self.state.schedule.epoch_end(row[f"{self.selected}_loss"])
        self.state.totals.count_epoch(result.images, result.seconds, result.images_per_rank)
        return row

    def score(self, row: dict, batches: int | None = None) -> None:
        """Add every held-out split's loss, top-1 and top-5 to `row`, by the model and the averaged weights
        (of the first `batches` evaluation batches of each split, when given)."""
        self.scoring.score(self.model, row, self.state.totals, self._evaluation_failed, batches)

    def _log_held(self, row: dict, held: float) -> None:
        """The epoch's row, with how long its checkpoint held training up, into the run's record."""
        self.run.record.log({**row, "checkpoint_seconds": held}, self.epochs, self.run.clock.left_text())

    def checkpoint(self, score: float | None = None, before_write: Callable[[float], None] | None = None) -> None:
        """Checkpoint this exact position (every rank calls it): the main process copies it to host
        memory, with the epoch's `score` when it may be the best so far, runs `before_write(seconds
        training was held up)`, then lets the background writer write it."""
        began, main = time.perf_counter(), self.accelerator.is_main_process
        with self._doing(f"checkpointing at epoch {self.state.epoch}, batch {self.state.progress.step}"):
            self.state.totals.wall_seconds = self.run.wall_before + began - self.started
            snap = self.state.state_dict()
            if main:
                snap.meta["config"] = self.config_dict
                if self.time_budget.plan is not None:
                    snap.meta["plan"] = self.time_budget.plan.to_dict()
                self.run.writer.copy(self.state.tag, snap, score)
            if before_write is not None:
                before_write(time.perf_counter() - began)
            if main:
                self.run.writer.start()
            self.accelerator.wait_for_everyone()

    def flush(self) -> None:
        """Every checkpoint on disk before any rank goes on: a rank that exits first (a stop, an
        error) makes the launcher end the main process, write or not."""
        self.run.writer.wait()
        self.accelerator.wait_for_everyone()

    def _halt(self, where: str) -> NoReturn:
        """End the run where a stop reached it, its checkpoint on disk."""
        self.flush()
        raise self.stops.preempted(f"{where}; checkpoint {self.run_dir / 'checkpoints' / 'last'}")

    def finish(self) -> Path:
        """summary.json, the closing line and the end of tracking; returns the run folder."""
        totals, acc = self.state.totals, self.accelerator
        self.doing = "writing the summary"
        summary = summarize(
            self.run.record.rows,
            recipe=self.cfg.recipe or self.cfg.name,
            name=self.run_dir.name,
            seed=self.cfg.seed,
            best_selected_on=self.selected,
            wall_seconds=self.run.wall_before + time.perf_counter() - self.started,
            images_per_second=totals.train_images / max(totals.train_seconds, 1e-9),
            world_size=acc.num_processes,
            images_per_rank=totals.images_per_rank,
            precision=self.precision,
            device=device_name(self.device_type),
            parameters=self.parameter_count,
            flops_per_image=self.flops_per_image,
            best_weights=self.cfg.train.ema.select,
            **self.time_budget.summary(self.state.schedule),
            micro_batch=self.memory_fit.micro_batch or self.batch,
            eval_batch_size=self.memory_fit.eval_batch,
        )
        self.run.record.finish(summary, self.selected)
        return self.run_dir
