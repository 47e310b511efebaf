"""The training batches of `data.pipeline`: per-sample torchvision in loader workers, or batched on the device."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from cifar100.config import AugmentConfig, DataConfig
from cifar100.data.batched import DeviceLoader
from cifar100.data.reference import AugmentedDataset, train_transform
from cifar100.errors import UserError
from cifar100.preemption import quiet_worker


def build_train_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    data: DataConfig,
    augment: AugmentConfig,
    *,
    seed: int,
    grad_accum: int,
    accelerator: Accelerator,
) -> DataLoader | DeviceLoader:
    """One process's loader over the training images, `batch` images a step."""
    if len(labels) < batch * accelerator.num_processes:
        raise UserError(
            f"data.batch_size={batch * accelerator.num_processes * grad_accum} is larger than the "
            f"{len(labels)} training images"
        )
    if data.pipeline == "device":
        loader = DeviceLoader(
            images,
            labels,
            batch,
            augment,
            seed=seed,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            device=accelerator.device,
        )
        if len(loader) % grad_accum:
            raise UserError(
                f"data.pipeline=device needs the {len(loader)} batches of an epoch to divide into "
                f"train.grad_accum={grad_accum} micro-steps; change data.batch_size or grad_accum"
            )
        return loader
    # Persistent workers: starting them anew every epoch costs about a second each time with 15
    # workers; the epoch reaches them through the dataset's shared-memory counter.
    return DataLoader(
        AugmentedDataset(
            images, labels, train_transform(augment), seed=seed, alternate_flips=augment.hflip == "alternating"
        ),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=data.workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=data.workers > 0,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=quiet_worker,
    )  # a signal to the process group is the main process's to handle


def epoch_batches(loader: DataLoader | DeviceLoader, epoch: int, skip: int, accelerator: Accelerator):
    """The loader positioned at `epoch`, batch `skip`: the same batches an uninterrupted run would see."""
    # The sampler's shuffle and the dataset's per-sample draws both follow the epoch; Accelerate's
    # loader forwards set_epoch to the dataset only in some layouts, so tell both.
    for part in (loader, getattr(loader, "dataset", None)):
        if part is not None and hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
    if not skip:
        return loader
    if isinstance(loader, DeviceLoader):
        return loader.skipping(skip)
    return accelerator.skip_first_batches(loader, skip)
