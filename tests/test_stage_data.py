"""bench/stage_data.py: the full data set cut into parts, rebuilt and verified on the other side."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cmd

pytestmark = pytest.mark.slow
SCRIPT = str(ROOT / "bench" / "stage_data.py")


def stage(*args) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, SCRIPT, *map(str, args)])


@pytest.fixture(scope="module")
def parts(tmp_path_factory, real_data):
    folder = tmp_path_factory.mktemp("parts")
    out = stage("split", real_data, folder)
    assert out.returncode == 0, out.stderr
    return folder


def test_split_writes_parts_under_60_mb_and_a_manifest_of_the_source(parts, real_data):
    manifest = json.loads((parts / "manifest.json").read_text())
    sizes = [p["bytes"] for p in manifest["parts"]]
    assert sizes == [(parts / p["name"]).stat().st_size for p in manifest["parts"]]
    assert len(sizes) == 4 and max(sizes) == 50_000_000 and max(sizes) < 60e6
    source = {f.name: f.stat().st_size for f in (real_data / "cifar-100-python").iterdir()}
    assert {f["name"]: f["bytes"] for f in manifest["files"]} == source
    assert sum(sizes) == sum(source.values())
    meta = next(f for f in manifest["files"] if f["name"] == "meta")
    # The manifest's hashes are the source's own.
    assert meta["sha256"] == hashlib.sha256((real_data / "cifar-100-python" / "meta").read_bytes()).hexdigest()


def test_join_rebuilds_byte_identical_files_and_a_second_join_keeps_them(parts, real_data, tmp_path):
    out = stage("join", parts, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rebuilt and verified meta, test, train" in out.stdout
    for name in ("meta", "test", "train"):
        rebuilt = tmp_path / "cifar-100-python" / name
        assert rebuilt.read_bytes() == (real_data / "cifar-100-python" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cifar-100-python").iterdir()) == ["meta", "test", "train"]
    again = stage("join", parts, tmp_path)
    assert again.returncode == 0 and "already holds every file, verified" in again.stdout


def test_a_corrupt_or_missing_part_is_refused_in_one_line_and_nothing_is_written(parts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in parts.iterdir():
        (bad / p.name).symlink_to(p)
    (bad / "part-02").unlink()
    data = bytearray((parts / "part-02").read_bytes())
    data[12345] ^= 1  # one flipped bit, same size
    (bad / "part-02").write_bytes(bytes(data))
    out = stage("join", bad, tmp_path / "dst")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: part part-02 is corrupt (size or sha256 differs from the manifest): carry it again"
    )
    assert not (tmp_path / "dst").exists()
    (bad / "part-02").unlink()
    out = stage("join", bad, tmp_path / "dst")
    assert out.returncode == 2 and out.stderr.strip().startswith("error: part part-02 is missing from")
    assert "Traceback" not in out.stderr


def test_split_refuses_a_folder_without_cifar_and_too_large_parts(tmp_path, real_data):
    out = stage("split", tmp_path, tmp_path / "p")
    assert out.returncode == 2 and out.stderr.startswith("error: no CIFAR-100 file")
    out = stage("split", real_data, tmp_path / "p", "--part-mb", "64")
    assert out.returncode == 2 and "--part-mb=64.0: must be above 0 and below 60" in out.stderr
