"""Shared fixtures: the repository root, the real dataset, and a subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real CIFAR-100 beside the checkout (read-only), or a skip saying where it was expected."""
    if not (REAL_DATA / "cifar-100-python" / "train").is_file():
        pytest.skip(f"real CIFAR-100 not found at {REAL_DATA}")
    return REAL_DATA


def clean_environ() -> dict[str, str]:
    """This process's environment without WANDB_SERVICE: wandb sets it once a test here used W&B,
    and a child that inherits it shares this process's wandb-core (and its runs) instead of its own."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}


def run_cmd(args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command of the project as a user would, capturing its output."""
    full_env = {**clean_environ(), "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    """`cli("show", "recipe=best")` runs `python -m cifar100 ...` in a subprocess."""
    def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        return run_cmd([sys.executable, "-m", "cifar100", *args], cwd=cwd)
    return run
