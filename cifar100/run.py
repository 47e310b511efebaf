"""A training run from start to finished run folder: builds the Accelerator and wires the parts.

Read top to bottom: precision and Accelerator, data, model, optimizer and schedule, run folder
(new, or the one a resume continues) and tracking, then the epoch loop (train, evaluate, log,
checkpoint), then the summary. A signal or a non-finite loss ends the loop early, after a
checkpoint or naming the last good one.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader

from cifar100 import data as cifar_data
from cifar100 import resume as resuming
from cifar100.checkpoint import (
    BackgroundWriter,
    apply_weights,
    host_copy,
    point_link,
    prune,
    save_best,
    save_checkpoint,
    step_tag,
)
from cifar100.config import Config, to_dict, to_yaml
from cifar100.device_data import DeviceLoader
from cifar100.engine import (
    EpochProgress,
    NonFiniteLoss,
    evaluate,
    reset_broken_norm_statistics,
    train_one_epoch,
)
from cifar100.errors import UserError
from cifar100.mixing import BatchMixer
from cifar100.models import build_model, count_parameters, flops_per_image
from cifar100.optim import Schedule, build_optimizer
from cifar100.preemption import Preempted, StopFlag
from cifar100.tracking import (
    append_metrics,
    finish_tracking,
    log_wandb,
    plot_history,
    read_metrics,
    rewrite_metrics,
    start_wandb,
    summarize,
    write_json_atomic,
)
from cifar100.transforms import AugmentedDataset, train_transform

NUM_CLASSES = 100


def resolve_precision(requested: str, device_type: str) -> str:
    """The precision that will really run: fp16/bf16 fall back to fp32 (with a warning) where unsupported."""
    if requested == "no":
        return "no"
    if device_type == "cuda":
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            warnings.warn("bf16 is not supported on this GPU; training in fp32", stacklevel=2)
            return "no"
        return requested
    warnings.warn(f"train.precision={requested} has no fast path on {device_type}; training in fp32 "
                  "(set train.precision=no to silence this)", stacklevel=2)
    return "no"


@dataclass(frozen=True)
class Splits:
    """Index tensors into the train set (train / val) and the test set."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def select_splits(dataset: cifar_data.Cifar100, cfg: Config) -> Splits:
    """Apply `data.val_size`, `data.train_limit` and `data.test_limit` (each a stratified, seeded choice;
    a limit at or above the split's size keeps it whole)."""
    train_idx, val_idx = cifar_data.validation_split(dataset.train.labels, cfg.data.val_size, cfg.seed)
    if 0 < cfg.data.train_limit < len(train_idx):
        _, keep = cifar_data.validation_split(dataset.train.labels[train_idx], cfg.data.train_limit, cfg.seed)
        train_idx = train_idx[keep]
    test_idx = torch.arange(dataset.test.labels.numel())
    if 0 < cfg.data.test_limit < len(test_idx):
        _, test_idx = cifar_data.validation_split(dataset.test.labels, cfg.data.test_limit, cfg.seed)
    return Splits(train_idx, val_idx, test_idx)


def per_process_batch(global_batch: int, world: int, accum: int) -> int:
    """`data.batch_size` is the global batch per optimizer step; this is one process's micro-batch."""
    if global_batch % (world * accum):
        raise UserError(f"data.batch_size={global_batch} must be divisible by processes x train.grad_accum = {world} x {accum}")
    return global_batch // (world * accum)


def build_train_loader(images: torch.Tensor, labels: torch.Tensor, batch: int, cfg: Config,
                       accelerator: Accelerator) -> DataLoader | DeviceLoader:
    """The training batches of `data.pipeline`: per-sample torchvision in workers, or batched on the device."""
    aug = cfg.augment
    if cfg.data.pipeline == "device":
        return DeviceLoader(images, labels, batch, crop_padding=aug.crop_padding, hflip=aug.hflip, vflip=aug.vflip,
                            color_jitter=aug.color_jitter, autoaugment=aug.autoaugment, mean=aug.mean, std=aug.std,
                            seed=cfg.seed, rank=accelerator.process_index, world=accelerator.num_processes,
                            device=accelerator.device)
    transform = train_transform(aug.crop_padding, aug.hflip, aug.vflip, aug.color_jitter, aug.autoaugment,
                                aug.mean, aug.std)
    # Persistent workers: starting them anew every epoch costs about a second each time with 15
    # workers; the epoch reaches them through the dataset's shared-memory counter.
    return DataLoader(AugmentedDataset(images, labels, transform, seed=cfg.seed), batch_size=batch, shuffle=True,
                      drop_last=True, num_workers=cfg.data.workers, pin_memory=accelerator.device.type == "cuda",
                      persistent_workers=cfg.data.workers > 0, generator=torch.Generator().manual_seed(cfg.seed))


def epoch_batches(loader: DataLoader | DeviceLoader, epoch: int, skip: int, accelerator: Accelerator):
    """The loader positioned at `epoch`, batch `skip`: the same batches an uninterrupted run would see."""
    # The sampler's shuffle and the dataset's per-sample draws both follow the epoch; Accelerate's
    # loader forwards set_epoch to the dataset only in some layouts, so tell both.
    for part in (loader, getattr(loader, "dataset", None)):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
    if not skip:
        return loader
    if isinstance(loader, DeviceLoader):
        return loader.skipping(skip)
    return accelerator.skip_first_batches(loader, skip)


def train(cfg: Config) -> Path:
    """Train as `cfg` says; returns the run folder (the same path on every process)."""
    started = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # Every training batch has one shape, so cuDNN's autotuner (timed once per shape) beats its heuristics.
    torch.backends.cudnn.benchmark = device_type == "cuda"
    precision = resolve_precision(cfg.train.precision, device_type)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="wandb" if cfg.log.wandb.mode != "disabled" else None,
        # non_blocking: copies from the pinned batches never make the host wait for the GPU.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True),
    )
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)
    if main:
        print(to_yaml(cfg), flush=True)
    config_dict = to_dict(cfg)

    with accelerator.main_process_first():
        dataset = cifar_data.load(cfg.data.root, cfg.data.download)
    splits = select_splits(dataset, cfg)
    aug = cfg.augment
    batch = per_process_batch(cfg.data.batch_size, world, cfg.train.grad_accum)
    if len(splits.train) < batch * world:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(splits.train)} training images")
    loader = build_train_loader(dataset.train.images[splits.train], dataset.train.labels[splits.train], batch, cfg,
                                accelerator)
    if isinstance(loader, DeviceLoader) and len(loader) % cfg.train.grad_accum:
        raise UserError(f"data.pipeline=device needs the {len(loader)} batches of an epoch to divide into "
                        f"train.grad_accum={cfg.train.grad_accum} micro-steps; change data.batch_size or grad_accum")

    model = build_model(cfg.model.name, NUM_CLASSES, cfg.model.act, cfg.model.cifar_stem, cfg.model.drop_rate)
    params, flops = count_parameters(model), flops_per_image(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)
    optimizer = build_optimizer(model, cfg.optim)
    if isinstance(loader, DeviceLoader):
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Checkpoints hold the uncompiled module's weights, so any run (compiled or not) can load them.
    prepared = model
    if cfg.train.compile:
        model = torch.compile(model)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    schedule = Schedule(optimizer, cfg.optim, cfg.sched, steps_per_epoch, cfg.train.epochs)
    mixer = BatchMixer(NUM_CLASSES, aug.cutmix.prob, aug.cutmix.alpha, aug.mixup.prob, aug.mixup.alpha, aug.label_smoothing)

    # Only now, with every part built and checked, the run folder: a bad value leaves no empty folder.
    # The main process picks it and the checkpoint; every process then loads the same one.
    found = resuming.locate(cfg.resume, cfg.log.dir, cfg.name) if main else None
    located = [str(found.run_dir), found.checkpoint and str(found.checkpoint)] if main else [None, None]
    broadcast_object_list(located)
    run_dir, ckpt_path = Path(located[0]), located[1] and Path(located[1])
    ckpt = resuming.load(ckpt_path, config_dict, found.read if main else None) if ckpt_path else None
    if ckpt:
        apply_weights(accelerator.unwrap_model(prepared), ckpt.weights, ckpt.path)

    totals = resuming.totals_from(ckpt.meta if ckpt else None, world)
    epoch, progress = totals.epochs_done + 1, EpochProgress()
    if ckpt:
        optimizer.load_state_dict(ckpt.train_state["optimizer"])
        schedule.load_state_dict(ckpt.train_state["schedule"])
        if accelerator.scaler is not None and ckpt.train_state.get("scaler"):
            accelerator.scaler.load_state_dict(ckpt.train_state["scaler"])
        mine = ckpt.train_state["ranks"][min(rank, len(ckpt.train_state["ranks"]) - 1)]
        torch.set_rng_state(mine["rng_cpu"])
        if device_type == "cuda" and mine["rng_cuda"] is not None:
            torch.cuda.set_rng_state(mine["rng_cuda"])
        if mine["progress"] is not None:
            progress = EpochProgress.from_state(mine["progress"], accelerator.device)

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["epoch"] <= totals.epochs_done]
    device_name = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    if main:
        rewrite_metrics(run_dir / "metrics.jsonl", rows)  # drops epochs logged after the checkpoint
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        totals.wandb_id = start_wandb(accelerator, cfg.log.wandb.project, cfg.log.wandb.entity, cfg.log.wandb.mode,
                                      run_dir, run_dir.name, config_dict, run_id=totals.wandb_id)
        where = f"resuming {ckpt.path} at epoch {epoch}, batch {progress.step}" if ckpt else "new run"
        accelerator.print(
            f"run folder {run_dir} ({where}) | model {cfg.model.name}: {params / 1e6:.2f} M parameters, "
            f"{flops / 1e9:.3f} GFLOP per image | {len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test images | {world} process(es) on {device_name}, "
            f"precision {precision}, {batch} images per process per step", flush=True)

    ckpt_dir = run_dir / "checkpoints"
    submitted: list[str] = []  # tags handed to the writer
    written: list[str] = []  # tags on disk, complete (appended by the writer's thread)
    writer = BackgroundWriter()
    selected = "val" if len(splits.val) else "test"

    def write(tag: str, model_state: dict, state: dict, meta: dict, best: bool) -> None:
        """The disk half of a checkpoint, on the writer's thread: a failure is a warning, never a stop."""
        try:
            save_checkpoint(ckpt_dir, tag, model_state, state, meta)
            point_link(ckpt_dir, "last", tag)
            prune(ckpt_dir, cfg.train.keep_last)
            written.append(tag)
            if best:
                save_best(ckpt_dir, tag, model_state, meta)
        except OSError as err:
            previous = written[-1] if written else (ckpt.path.name if ckpt else "none")
            warnings.warn(f"checkpoint {tag} not saved ({err.strerror or err}); the previous checkpoint "
                          f"({previous}) is intact and loadable", stacklevel=1)

    def save(epoch_done: bool, best: bool = False) -> None:
        """Checkpoint the exact position; every rank calls it (each contributes its RNG and sums).
        The state is copied to host memory here and written in the background."""
        # A step skipped just before may have broken norm statistics the engine resets only when it
        # reads that step's flags, one step later: a checkpoint must not keep them.
        reset_broken_norm_statistics(prepared)
        tag = step_tag(schedule.step_count)
        mine = {"rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None,
                "progress": None if epoch_done else progress.state_dict()}
        ranks = gather_object([mine])
        model_state = accelerator.get_state_dict(prepared)
        if main and not (submitted and submitted[-1] == tag):
            totals.wall_seconds = wall_before + time.perf_counter() - started
            meta = {"epoch": epoch, "step_in_epoch": 0 if epoch_done else progress.step, "global_step": schedule.step_count,
                    "totals": asdict(totals), "config": config_dict}
            state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "ranks": ranks,
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
            writer.wait()  # one copy of the state in host memory at a time
            writer.submit(partial(write, tag, host_copy(model_state), host_copy(state), meta, best))
            submitted.append(tag)
        accelerator.wait_for_everyone()

    def flush() -> None:
        """Every checkpoint on disk before any rank goes on: a rank that exits first (a stop, an
        error) makes the launcher end the main process, write or not."""
        writer.wait()
        accelerator.wait_for_everyone()

    def after_step(state: EpochProgress) -> None:
        every = cfg.train.checkpoint_every_steps
        if every and schedule.step_count % every == 0 and state.step < len(loader):
            save(epoch_done=False)

    wall_before = totals.wall_seconds
    # Installed for the rest of the process: during a preemption's clean-up a second signal still exits at once.
    flag = StopFlag()
    flag.install()
    # Indexed once, not every epoch; on the device already when the training data lives there.
    eval_device = accelerator.device if cfg.data.pipeline == "device" else torch.device("cpu")
    test_images, test_labels = (t.to(eval_device) for t in (dataset.test.images[splits.test], dataset.test.labels[splits.test]))
    val_images, val_labels = (t.to(eval_device) for t in (dataset.train.images[splits.val], dataset.train.labels[splits.val]))
    eval_kwargs = {"mean": aug.mean, "std": aug.std, "batch_size": cfg.data.eval_batch_size,
                   "channels_last": cfg.train.channels_last}
    while epoch <= cfg.train.epochs:
        lr = schedule.lr_at(schedule.step_count - progress.step // cfg.train.grad_accum)
        batches = epoch_batches(loader, epoch, progress.step, accelerator)
        try:
            result = train_one_epoch(
                model, batches, optimizer, schedule, mixer, accelerator, epoch=epoch, seed=cfg.seed,
                clip_grad=cfg.train.clip_grad, channels_last=cfg.train.channels_last, progress=cfg.log.progress,
                state=progress, stop_requested=flag.__bool__, max_bad_steps=cfg.train.max_bad_steps,
                after_step=after_step)
        except NonFiniteLoss as err:
            flush()
            last = ckpt_dir / written[-1] if written else (ckpt.path if ckpt else None)
            raise UserError(f"{err}: stopping. Last good checkpoint: {last or 'none yet'}; resume with resume=auto "
                            "after lowering optim.lr or setting train.clip_grad, or allow skips with "
                            "train.max_bad_steps=N") from None
        if result is None:
            save(epoch_done=False)
            flush()
            raise Preempted(f"stopped by {flag.name or 'a signal on another rank'} at epoch {epoch}, "
                            f"batch {progress.step}; checkpoint {ckpt_dir / 'last'}")
        row = {"epoch": epoch, "lr": lr, "train_loss": result.loss, "train_top1": result.top1}
        eval_started = time.perf_counter()
        if len(splits.val):
            val = evaluate(model, val_images, val_labels, accelerator, **eval_kwargs)
            row.update(val_loss=val.loss, val_top1=val.top1, val_top5=val.top5)
        test = evaluate(model, test_images, test_labels, accelerator, **eval_kwargs)
        row.update(test_loss=test.loss, test_top1=test.top1, test_top5=test.top5,
                   epoch_seconds=result.seconds, images_per_second=result.images / result.seconds,
                   eval_seconds=time.perf_counter() - eval_started)
        schedule.epoch_end(row[f"{selected}_loss"])
        totals.epochs_done = epoch
        totals.train_images += result.images
        totals.train_seconds += result.seconds
        totals.images_per_rank = [a + b for a, b in zip(totals.images_per_rank, result.images_per_rank)]
        rows.append(row)
        is_best = row[f"{selected}_top1"] > totals.best_top1
        if is_best:
            totals.best_top1 = row[f"{selected}_top1"]
        if main:
            append_metrics(run_dir / "metrics.jsonl", row)
            log_wandb(accelerator, row, plot_history(rows, run_dir, run_dir.name))
            accelerator.print(
                f"epoch {epoch}/{cfg.train.epochs} | lr {lr:.3g} | train loss {row['train_loss']:.4f} "
                f"top1 {row['train_top1']:.2%} | " + (f"val top1 {row['val_top1']:.2%} | " if len(splits.val) else "")
                + f"test loss {row['test_loss']:.4f} top1 {row['test_top1']:.2%} top5 {row['test_top5']:.2%} | "
                f"{result.seconds:.1f} s, {row['images_per_second']:.0f} img/s", flush=True)
        saving = time.perf_counter()
        save(epoch_done=True, best=is_best)
        if main:  # how long the checkpoint held training up; the row is on disk before the checkpoint
            rows[-1]["checkpoint_seconds"] = time.perf_counter() - saving
            rewrite_metrics(run_dir / "metrics.jsonl", rows)
        epoch, progress = epoch + 1, EpochProgress()
        stop = accelerator.reduce(torch.tensor(float(bool(flag)), device=accelerator.device), reduction="sum")
        if stop.item() > 0 and epoch <= cfg.train.epochs:
            flush()
            raise Preempted(f"stopped by {flag.name or 'a signal on another rank'} after epoch {epoch - 1}; "
                            f"checkpoint {ckpt_dir / 'last'}")
    flag.uninstall()
    flush()

    summary = summarize(
        rows, recipe=cfg.recipe or cfg.name, name=run_dir.name, seed=cfg.seed, best_selected_on=selected,
        wall_seconds=wall_before + time.perf_counter() - started,
        images_per_second=totals.train_images / max(totals.train_seconds, 1e-9),
        world_size=world, images_per_rank=totals.images_per_rank, precision=precision, device=device_name,
        parameters=params, flops_per_image=flops,
    )
    if main:
        write_json_atomic(run_dir / "summary.json", summary)
        accelerator.print(
            f"done in {summary['wall_seconds']:.0f} s: final test top1 {summary['final_test_top1']:.2%}, "
            f"best {selected} top1 {totals.best_top1:.2%} | {run_dir}", flush=True)
    finish_tracking(accelerator, run_dir, summary)
    return run_dir
