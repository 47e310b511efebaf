"""Shared fixtures: the repository root, the real dataset, a subprocess runner and a small real disk."""

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


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for the first checkpoints, not for all of them."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(mount: Path) -> Path:
    """Take every free byte of `mount` with one file; returns it (delete it to free the space)."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler
