"""A training run from start to finished run folder: builds the Accelerator and wires the parts.

Read top to bottom: precision and Accelerator, data, model, optimizer and schedule, run folder
and tracking, then the epoch loop (train, evaluate, log, checkpoint), then the summary.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from cifar100 import data as cifar_data
from cifar100.checkpoint import save_checkpoint
from cifar100.config import Config, to_dict, to_yaml
from cifar100.device_data import DeviceLoader
from cifar100.engine import evaluate, train_one_epoch
from cifar100.errors import UserError
from cifar100.mixing import BatchMixer
from cifar100.models import build_model, count_parameters, flops_per_image
from cifar100.optim import Schedule, build_optimizer
from cifar100.tracking import (append_metrics, log_wandb, plot_history, start_wandb, summarize,
                               unique_run_dir, write_json_atomic)
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
    """Apply `data.val_size`, `data.train_limit` and `data.test_limit` (each a stratified, seeded choice)."""
    train_idx, val_idx = cifar_data.validation_split(dataset.train.labels, cfg.data.val_size, cfg.seed)
    if cfg.data.train_limit:
        _, keep = cifar_data.validation_split(dataset.train.labels[train_idx], cfg.data.train_limit, cfg.seed)
        train_idx = train_idx[keep]
    test_idx = torch.arange(dataset.test.labels.numel())
    if cfg.data.test_limit:
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
    return DataLoader(AugmentedDataset(images, labels, transform, seed=cfg.seed), batch_size=batch, shuffle=True,
                      drop_last=True, num_workers=cfg.data.workers, pin_memory=accelerator.device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.seed))


def train(cfg: Config) -> Path:
    """Train as `cfg` says; returns the run folder (the same path on every process)."""
    started = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.train.precision, device_type)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="wandb" if cfg.log.wandb.mode != "disabled" else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    if main:
        print(to_yaml(cfg), flush=True)

    with accelerator.main_process_first():
        dataset = cifar_data.load(cfg.data.root, cfg.data.download)
    splits = select_splits(dataset, cfg)
    aug = cfg.augment
    batch = per_process_batch(cfg.data.batch_size, accelerator.num_processes, cfg.train.grad_accum)
    if len(splits.train) < batch * accelerator.num_processes:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is larger than the {len(splits.train)} training images")
    loader = build_train_loader(dataset.train.images[splits.train], dataset.train.labels[splits.train], batch, cfg,
                                accelerator)

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
    if cfg.train.compile:
        model = torch.compile(model)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    schedule = Schedule(optimizer, cfg.optim, cfg.sched, steps_per_epoch, cfg.train.epochs)
    mixer = BatchMixer(NUM_CLASSES, aug.cutmix.prob, aug.cutmix.alpha, aug.mixup.prob, aug.mixup.alpha, aug.label_smoothing)

    run_dir = [unique_run_dir(cfg.log.dir, cfg.name) if main else None]
    broadcast_object_list(run_dir)
    run_dir = Path(run_dir[0])
    config_dict = to_dict(cfg)
    device_name = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    if main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        start_wandb(accelerator, cfg.log.wandb.project, cfg.log.wandb.entity, cfg.log.wandb.mode, run_dir, run_dir.name, config_dict)
        accelerator.print(
            f"run folder {run_dir} | model {cfg.model.name}: {params / 1e6:.2f} M parameters, "
            f"{flops / 1e9:.3f} GFLOP per image | {len(splits.train)} train / {len(splits.val)} val / "
            f"{len(splits.test)} test images | {accelerator.num_processes} process(es) on {device_name}, "
            f"precision {precision}, {batch} images per process per step")

    rows, train_images, train_seconds = [], 0, 0.0
    images_per_rank = [0] * accelerator.num_processes
    best_top1 = -1.0
    eval_kwargs = dict(mean=aug.mean, std=aug.std, batch_size=cfg.data.eval_batch_size, channels_last=cfg.train.channels_last)
    for epoch in range(1, cfg.train.epochs + 1):
        # The sampler's shuffle and the dataset's per-sample draws both follow the epoch; Accelerate's
        # loader forwards set_epoch to the dataset only in some layouts, so tell both.
        for part in (loader, getattr(loader, "dataset", None)):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        lr = schedule.lr
        result = train_one_epoch(model, loader, optimizer, schedule, mixer, accelerator, epoch=epoch, seed=cfg.seed,
                                 clip_grad=cfg.train.clip_grad, channels_last=cfg.train.channels_last,
                                 progress=cfg.log.progress)
        row = {"epoch": epoch, "lr": lr, "train_loss": result.loss, "train_top1": result.top1}
        selected = "test"
        if len(splits.val):
            val = evaluate(model, dataset.train.images[splits.val], dataset.train.labels[splits.val], accelerator, **eval_kwargs)
            row.update(val_loss=val.loss, val_top1=val.top1, val_top5=val.top5)
            selected = "val"
        test = evaluate(model, dataset.test.images[splits.test], dataset.test.labels[splits.test], accelerator, **eval_kwargs)
        row.update(test_loss=test.loss, test_top1=test.top1, test_top5=test.top5,
                   epoch_seconds=result.seconds, images_per_second=result.images / result.seconds)
        schedule.epoch_end(row[f"{selected}_loss"])
        train_images += result.images
        images_per_rank = [a + b for a, b in zip(images_per_rank, result.images_per_rank)]
        train_seconds += result.seconds
        rows.append(row)
        if main:
            append_metrics(run_dir / "metrics.jsonl", row)
            images = plot_history(rows, run_dir, run_dir.name)
            log_wandb(accelerator, row, images)
            accelerator.print(
                f"epoch {epoch}/{cfg.train.epochs} | lr {lr:.3g} | train loss {row['train_loss']:.4f} "
                f"top1 {row['train_top1']:.2%} | " + (f"val top1 {row['val_top1']:.2%} | " if selected == "val" else "")
                + f"test loss {row['test_loss']:.4f} top1 {row['test_top1']:.2%} top5 {row['test_top5']:.2%} | "
                f"{result.seconds:.1f} s, {row['images_per_second']:.0f} img/s", flush=True)
        model_state = accelerator.get_state_dict(model)
        meta = {"epoch": epoch, "step": schedule.step_count, "config": config_dict,
                f"{selected}_top1": row[f"{selected}_top1"]}
        if main:
            ckpt_dir = run_dir / "checkpoints"
            save_checkpoint(ckpt_dir, "last", model_state, {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, meta)
            if row[f"{selected}_top1"] > best_top1:
                best_top1 = row[f"{selected}_top1"]
                save_checkpoint(ckpt_dir, "best", model_state, {}, meta)
        accelerator.wait_for_everyone()

    summary = summarize(
        rows, recipe=cfg.recipe or cfg.name, name=run_dir.name, seed=cfg.seed, best_selected_on=selected,
        wall_seconds=time.perf_counter() - started, images_per_second=train_images / max(train_seconds, 1e-9),
        world_size=accelerator.num_processes, images_per_rank=images_per_rank, precision=precision, device=device_name,
        parameters=params, flops_per_image=flops,
    )
    if main:
        write_json_atomic(run_dir / "summary.json", summary)
        accelerator.print(
            f"done in {summary['wall_seconds']:.0f} s: final test top1 {summary['final_test_top1']:.2%}, "
            f"best {summary['best_test_top1']:.2%} at epoch {summary['best_epoch']} | {run_dir}", flush=True)
    accelerator.end_training()
    return run_dir
