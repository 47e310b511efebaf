"""compile_cache: a kernel library torn by a killed compile is rebuilt, not loaded, by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cifar100.training.compile_cache import drop_torn_libraries, is_torn

LIBRARY = Path(sys.executable).resolve()  # any real ELF64 file will do


def torn_copy(path: Path, keep: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(LIBRARY.read_bytes()[:keep])
    return path


def test_a_whole_elf_file_is_kept_and_one_cut_anywhere_is_torn(tmp_path):
    whole = tmp_path / "whole.so"
    whole.write_bytes(LIBRARY.read_bytes())
    assert not is_torn(whole)
    size = whole.stat().st_size
    for keep in (0, 10, 63, 64, 4096, size // 2, size - 1):
        assert is_torn(torn_copy(tmp_path / f"cut{keep}.so", keep)), keep
    (tmp_path / "text.so").write_text("not a library")
    assert is_torn(tmp_path / "text.so")
    assert not is_torn(tmp_path / "missing.so")


def test_only_torn_libraries_nobody_is_building_are_removed(tmp_path):
    whole = tmp_path / "ab" / "cabkey.so"
    whole.parent.mkdir()
    whole.write_bytes(LIBRARY.read_bytes())
    torn = torn_copy(tmp_path / "cd" / "ccdkey.main.so", 5000)
    building = torn_copy(tmp_path / "ef" / "cefkey.so", 5000)
    source = torn_copy(tmp_path / "ef" / "cefkey.cpp", 10)  # not a library: never touched
    (tmp_path / "locks").mkdir()
    # Another process holds the lock torch takes while it builds cefkey: that file is being written.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock\n"
            f"with FileLock({str(tmp_path / 'locks' / 'cefkey.lock')!r}):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert drop_torn_libraries(tmp_path) == [torn]
        assert whole.exists() and building.exists() and source.exists() and not torn.exists()
    finally:
        holder.kill()
        holder.wait()
    assert drop_torn_libraries(tmp_path) == [building]


COMPILE = textwrap.dedent(
    """
    import sys, torch
    from cifar100.training.compile_cache import compiled
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    run = compiled(model) if sys.argv[1] == "ours" else torch.compile(model)
    print(float(run(torch.ones(2, 8)).sum()))
    """
)


@pytest.mark.slow
def test_a_run_after_a_killed_compile_builds_the_torn_library_again(tmp_path):
    """What a kill during compiling leaves (a cut library at its final name) breaks every later
    plain torch.compile of the same kernel (an ImportError, "file too short", or a SIGBUS, by
    where the cut falls); through `compiled` the same cache works again."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def run(which: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", COMPILE, which], env=env, capture_output=True, text=True)

    first = run("plain")
    assert first.returncode == 0, first.stderr[-2000:]
    libraries = sorted((tmp_path / "cache").glob("??/*.so"))
    assert libraries
    for library in libraries:
        os.truncate(library, library.stat().st_size // 3)
    broken = run("plain")
    assert broken.returncode != 0
    again = run("ours")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == first.stdout
    assert not any(is_torn(library) for library in libraries)
