"""Every command starts with glibc told to keep freed memory (cifar100/allocator.py)."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys

import pytest
from conftest import ROOT, clean_environ

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

# A command run through the entry point every launcher reaches (train.py and `cifar100` call
# cli.main), then a 400 MB buffer freed: does the process keep its pages?
PROBE = """
import sys, numpy, psutil
from cifar100.cli import main
if sys.argv[1:]:
    main(sys.argv[1:])
buffer = numpy.ones(50_000_000)
held = psutil.Process().memory_info().rss
del buffer
print(held - psutil.Process().memory_info().rss > 300e6)
"""


def gives_back(*argv: str, env: dict | None = None, limit: int | None = None) -> bool:
    def limited() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=ROOT,
        env={**clean_environ(), **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=limited,
    )
    return out.stdout.strip().splitlines()[-1] == "True"


def test_a_started_command_keeps_freed_memory_where_plain_python_gives_it_back():
    assert gives_back()  # glibc's default: a large buffer is its own mmap, unmapped on free
    assert not gives_back("show", "recipe=smoke")


def test_the_users_own_malloc_tunables_are_left_as_they_are():
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}
    assert gives_back("show", "recipe=smoke", env=tunables)


def test_under_an_address_space_limit_freed_memory_goes_back():
    # `ulimit -v` counts a kept heap and its holes: a run under it allocates as glibc does by default.
    assert gives_back("show", "recipe=smoke", limit=16 * 2**30)
