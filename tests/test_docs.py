"""The documentation shows the program's real output, and its links lead somewhere.

A fenced ``console`` block right after a line ``<!-- checked -->`` in README.md or docs/*.md is an
example: each line starting with ``$ `` is a command, run by bash from the repository root, and the
lines up to the next command are what it prints (stdout and stderr together, trailing spaces
ignored; a line ``...`` stands for any number of lines). A command that shows a line starting with
``error:`` must exit with status 2 (a refused input), any other with 0.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "launch" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- checked -->"
ELISION = "..."


@dataclass(frozen=True)
class Example:
    """One command of a checked block and the output its page shows."""

    page: str
    line: int
    command: str
    expected: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def checked_examples(page: Path) -> list[Example]:
    """The commands of the page's checked blocks, each with the lines shown after it."""
    lines = page.read_text().splitlines()
    examples: list[Example] = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```console", (
            f"{page.name}:{i + 1}: {MARKER} must stand right before a ```console block"
        )
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        block = lines[i + 2 : end]
        assert block and block[0].startswith("$ "), f"{page.name}:{i + 3}: a checked block starts with a `$ ` command"
        starts = [k for k, text in enumerate(block) if text.startswith("$ ")] + [len(block)]
        for k, next_k in itertools.pairwise(starts):
            examples.append(
                Example(
                    page.relative_to(ROOT).as_posix(),
                    i + 3 + k,
                    block[k][2:],
                    tuple(text.rstrip() for text in block[k + 1 : next_k]),
                )
            )
    return examples


def matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Whether the printed lines equal the shown ones, each `...` line standing for any lines."""
    if not expected:
        return not actual
    if expected[0] == ELISION:
        return any(matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and actual[0] == expected[0] and matches(expected[1:], actual[1:])


EXAMPLES = [example for page in PAGES for example in checked_examples(page)]


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a reader's shell in this checkout: `cifar100` and `python` are its own."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "cifar100"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cifar100 "$@"\n')
    shim.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "PYTEST_"))}
    for key in ("GPUS_PER_NODE", "CPU_PROCS", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_the_pages_hold_the_examples_the_issue_names() -> None:
    commands = [example.command for example in EXAMPLES]
    for wanted in ("cifar100 recipes", "cifar100 show recipe=smoke", "python train.py -h", "optim.lrr=0.1"):
        assert any(wanted in command for command in commands), f"no checked example runs {wanted!r}"


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_checked_example_prints_what_the_page_shows(example: Example, shell_env: dict[str, str]) -> None:
    done = subprocess.run(
        ["bash", "-c", example.command],
        cwd=ROOT,
        env=shell_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    actual = [text.rstrip() for text in done.stdout.rstrip("\n").splitlines()]
    assert matches(example.expected, actual), (
        f"{example}: `{example.command}` printed\n"
        + "\n".join(actual)
        + "\n\nbut the page shows\n"
        + "\n".join(example.expected)
    )
    wanted_status = 2 if any(text.startswith("error:") for text in example.expected) else 0
    assert done.returncode == wanted_status, f"{example}: exit status {done.returncode}, not {wanted_status}"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The `#anchor` of each heading as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            n = 1
            while slug in found:  # a repeated heading gets -1, -2, ...
                slug = f"{re.sub(r'-[0-9]+$', '', slug)}-{n}"
                n += 1
            found.add(slug)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file_and_anchor(page: Path) -> None:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())  # links inside code are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
