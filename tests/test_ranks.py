"""Decisions taken on the main process and shared (`ranks.main_decides`); several processes share them
in the DDP runs of test_memory.py, test_resume.py and test_cluster.py."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from cifar100.training.ranks import main_decides

pytestmark = pytest.mark.usefixtures("accelerate_state")


def test_the_main_process_decides_once_and_its_answer_comes_back():
    asked = []

    def decide() -> tuple[str, list[dict]]:
        asked.append(1)
        return "runs/r", [{"epoch": 1}]

    assert main_decides(Accelerator(cpu=True), decide) == ("runs/r", [{"epoch": 1}]) and asked == [1]
