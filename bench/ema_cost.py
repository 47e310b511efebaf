"""What weight averaging adds to a recipe: the update's time per optimizer step, and the time of
one evaluation of the averaged weights beside one of the model's, on the real test set.

Usage: python bench/ema_cost.py RECIPE DATA_ROOT [UPDATES]. The recipe must set train.ema; the
model is evaluated as the trainer does (channels_last as the recipe says, data.eval_batch_size).
"""

from __future__ import annotations

import sys
import time

import torch
from accelerate import Accelerator

from cifar100.config import load_config
from cifar100.data import cifar as cifar_data
from cifar100.training.ema import WeightAverage
from cifar100.training.engine import EvalSettings, evaluate
from cifar100.training.models import build_model


def main(recipe: str, root: str, updates: int = 200) -> None:
    cfg = load_config(recipe, [f"data.root={root}"])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = build_model(cfg.model, cifar_data.NUM_CLASSES)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)  # the average is made where the model lives, as in training
    average, good = WeightAverage(model, cfg.train.ema), torch.tensor(False)
    for step in range(1, 21):  # past the first updates (a copy, then warm-up decays)
        average.after_step(step, good)
    start = time.perf_counter()
    for step in range(21, 21 + updates):
        average.after_step(step, good)
    print(f"update: {(time.perf_counter() - start) / updates * 1e3:.2f} ms per optimizer step")
    dataset = cifar_data.load(root, False)
    for name, net in (("model", model), ("averaged weights", average.module)):
        start = time.perf_counter()
        scored = evaluate(net, dataset.test.images, dataset.test.labels, accelerator, EvalSettings.from_config(cfg))
        print(f"evaluation of the {name}: {time.perf_counter() - start:.2f} s for {scored.images} test images")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
