"""W&B through Accelerate: a real offline run, grouped by recipe and tagged with recipe and model."""

from __future__ import annotations

import os

from accelerate import Accelerator

from cifar100.config import load_config, to_dict
from cifar100.runfolder.tracking import start_wandb


def test_wandb_run_is_grouped_by_recipe_and_tagged(tmp_path, wandb_in_process):
    accelerator = Accelerator(cpu=True, log_with="wandb")
    config = to_dict(load_config("best", []))
    run_id = start_wandb(accelerator, "cifar100-tests", None, "offline", tmp_path, "r1", config)
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
        assert run.id == run_id and run.name == "r1"
        assert run.group == "best" and sorted(run.tags) == ["best", "seresnet50"]
        assert run.config["optim"]["name"] == config["optim"]["name"]
        assert os.path.commonpath([run.dir, str(tmp_path)]) == str(tmp_path)  # inside the run folder
    finally:
        accelerator.end_training()
