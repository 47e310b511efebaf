"""Shared fixtures: the repository root, the real dataset, a subprocess runner, a small real disk, folders
made once per session, and how the tests share two xdist workers."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data"

# One intra-op thread in this process and in every process a test starts (set before torch is
# imported): two xdist workers share two cores, and a resumed run and its reference still train
# on the same number of threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# torch's inductor sets TORCHINDUCTOR_CACHE_DIR to its default the first time anything asks for its
# cache (importing timm.optim does): set to that value before any test, so that it is no test's doing.
from cifar100.training.compile_cache import cache_root  # noqa: E402  (after the thread setting above)

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root()))

# In an xdist worker (`pytest -n N`, which sets PYTEST_XDIST_WORKER=gw<i>), two-process launches get
# a rendezvous port of the worker's own: torchrun's --master-port, which it reads from PET_MASTER_PORT,
# defaults to 29500 in every worker. Like 29500, these lie below the kernel's ephemeral ports.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ["PET_MASTER_PORT"] = str(29510 + int(os.environ["PYTEST_XDIST_WORKER"][2:]))

# Files whose tests run in one xdist worker, one after another (`--dist loadgroup`): the Slurm tests
# share this machine's CPUs and daemons and must not compete with each other for them; the others
# write into the folder their module fixture made once (an evaluation's files, a report's notes).
SERIAL_GROUPS = {
    "test_cluster.py": "slurm",
    "test_sweep_cluster.py": "slurm",
    "test_evaluate.py": "evaluate",
    "test_report.py": "report",
    "test_stage_data.py": "stage_data",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shuffle",
        type=int,
        metavar="SEED",
        help="run the tests in an order shuffled by SEED (the same in every xdist worker): the suite's "
        "results must not depend on order",
    )


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle")
    if seed is not None:
        random.Random(seed).shuffle(items)
    for item in items:
        group = SERIAL_GROUPS.get(item.path.name)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


# Set by pytest around each test; everything else in the environment must be as the test found it.
_PYTEST_VARIABLES = ("PYTEST_CURRENT_TEST",)
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGCONT)
_ACCELERATE_SINGLETONS = ("PartialState", "AcceleratorState", "GradientState")


def process_state() -> dict[str, Any]:
    """What one test could change for every test after it in this process: the environment, the working
    directory, signal handlers, torch's threads and defaults, and Accelerate's process-wide state (each
    library's only once it is imported: before, nothing of it can have changed)."""
    state: dict[str, Any] = {
        "environment": {k: v for k, v in os.environ.items() if k not in _PYTEST_VARIABLES},
        "working directory": os.getcwd(),
        "signal handlers": {s.name: signal.getsignal(s) for s in _SIGNALS},
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = {
            "threads": torch.get_num_threads(),
            "default dtype": torch.get_default_dtype(),
            "grad enabled": torch.is_grad_enabled(),
            "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn benchmark": torch.backends.cudnn.benchmark,
            "float32 matmul precision": torch.get_float32_matmul_precision(),
        }
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None:
        state["Accelerate"] = {
            f"{name} made": bool(getattr(accelerate_state, name)._shared_state) for name in _ACCELERATE_SINGLETONS
        }
    return state


def _fresh(what: str) -> dict[str, Any]:
    """A library's part of `process_state` in a fresh process that has just imported it."""
    if what == "torch":
        torch = sys.modules["torch"]
        return {
            "threads": int(os.environ["OMP_NUM_THREADS"]),
            "default dtype": torch.float32,
            "grad enabled": True,
            "deterministic algorithms": False,
            "cudnn benchmark": False,
            "float32 matmul precision": "highest",
        }
    return {f"{name} made": False for name in _ACCELERATE_SINGLETONS}


@pytest.fixture(autouse=True)
def leaves_no_process_state():
    """Fail a test that leaves process-wide state behind: whatever ran before it in this xdist worker (in
    any order, however xdist shares the tests out), the next test must find the process as it found it,
    and torch and Accelerate as a fresh process has them."""
    before = process_state()
    yield
    changed = []
    for what, now in process_state().items():
        was = _fresh(what) if what in ("torch", "Accelerate") else before[what]
        if was == now:
            continue
        if isinstance(was, dict):
            keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
            changed.append(f"{what} ({', '.join(f'{k}: {was.get(k)!r} -> {now.get(k)!r}' for k in keys)})")
        else:
            changed.append(f"{what} ({was!r} -> {now!r})")
    assert not changed, "the test left process-wide state behind: " + "; ".join(changed)


@pytest.fixture
def accelerate_state():
    """For a test that makes Accelerators itself: Accelerate's state starts empty and is released after
    it, and torch's thread count put back, as every command does for itself."""
    from cifar100.training.runtime import fresh_process_state

    with fresh_process_state():
        yield


@pytest.fixture
def wandb_in_process(monkeypatch, accelerate_state):
    """For a test that runs W&B in this process (through an Accelerator's tracker): quiet, with a W&B
    service of its own that ends with the test (its WANDB_SERVICE variable too)."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    yield
    import wandb

    wandb.teardown()
    os.environ.pop("WANDB_SERVICE", None)


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """A folder that `make(folder)` fills once per test session, for all xdist workers: the first to ask
    makes it while the others wait for it. Tests read it (or copy it), never change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder; each worker's own is inside it
    shared = root / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


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


def overridden(defaults: list[str], extra: tuple[str, ...] | list[str]) -> list[str]:
    """`defaults` (key=value) less the keys `extra` sets, then `extra`: a command line gives each key
    once (the CLI refuses one given twice)."""
    keys = {e.partition("=")[0] for e in extra}
    return [d for d in defaults if d.partition("=")[0] not in keys] + list(extra)


def run_cmd(
    args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
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


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one can write into: a read-only tmpfs when running as root (root ignores modes)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


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


def _train_and_export(folder: Path) -> None:
    """A 1-epoch smoke run (channels_last, so that the export must undo it) and its exported best checkpoint."""
    train = run_cmd(
        [
            sys.executable,
            "train.py",
            "recipe=smoke",
            "name=tiny",
            "train.epochs=1",
            "train.channels_last=true",
            f"data.root={REAL_DATA}",
            f"log.dir={folder}",
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    export = run_cmd([sys.executable, "-m", "cifar100", "export", f"run={folder / 'tiny'}"])
    assert export.returncode == 0, export.stderr[-3000:]


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, real_data) -> Path:
    """A tiny trained run with `export/tiny-best.{onnx,pt2,json}`, made once per session (read it, or copy it)."""
    return shared_folder(tmp_path_factory, "exported_run", _train_and_export) / "tiny"


def _write_test_pngs(folder: Path) -> None:
    from PIL import Image

    from cifar100.data.cifar import load

    for i, image in enumerate(load(REAL_DATA).test.images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:05d}.png", compress_level=1)


@pytest.fixture(scope="session")
def test_pngs(tmp_path_factory, real_data) -> Path:
    """The 10,000 real test images as PNG files, `<index in the test split>.png`, made once per session."""
    return shared_folder(tmp_path_factory, "test_pngs", _write_test_pngs)
