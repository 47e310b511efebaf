"""Reads and writes that what lies on disk cannot lead astray: real links, FIFOs, devices, planted
temporary names, two writers at once and files past their size bound."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cifar100.errors import UserError
from cifar100.runfolder import safe_files
from cifar100.runfolder.safe_files import (
    make_folders,
    read_bounded,
    read_json,
    refuse_run_folder,
    require_regular,
    run_folder_of,
    write_all_atomic,
    write_atomic,
)


def test_a_write_never_goes_through_a_link_nor_removes_what_it_did_not_make(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for planted in (".out.csv.tmp", ".out.csv.tmp.csv", ".out.csv.XXXX.tmp"):  # the old fixed names, and a guess
        (folder / planted).symlink_to(outside)
    (folder / ".mine.tmp").write_text("the user's own file\n")
    (folder / "out.csv").symlink_to(outside)  # the final name a link: replaced, not written through
    write_atomic(folder / "out.csv", b"answers\n")
    assert outside.read_text() == "precious\n"
    assert (folder / "out.csv").read_text() == "answers\n" and not (folder / "out.csv").is_symlink()
    assert (folder / ".mine.tmp").read_text() == "the user's own file\n"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".out.csv.tmp", ".out.csv.tmp.csv", ".out.csv.XXXX.tmp", ".mine.tmp", "out.csv"]
    )


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path, monkeypatch):
    names: list[str] = []
    real = safe_files.tempfile.mkstemp

    def recorded(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        names.append(name)
        time.sleep(0.05)  # both writers hold their temporary file at once
        return fd, name

    monkeypatch.setattr(safe_files.tempfile, "mkstemp", recorded)
    target = tmp_path / "summary.json"
    writers = [threading.Thread(target=write_atomic, args=(target, f"{i}\n".encode() * 1000)) for i in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert len(set(names)) == 2 and all(Path(n).name.startswith(".summary.json.") for n in names)
    assert target.read_text() in ("0\n" * 1000, "1\n" * 1000)  # one whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_set_of_writes_that_does_not_fit_leaves_every_old_file(small_disk):
    (small_disk / "a.onnx").write_text("old a\n")
    with pytest.raises(OSError, match="No space left"):  # the second file does not fit on the 1 MiB disk
        write_all_atomic({small_disk / "a.onnx": b"new a\n", small_disk / "a.json": b"x" * 2**21})
    assert (small_disk / "a.onnx").read_text() == "old a\n"
    assert [p.name for p in small_disk.iterdir()] == ["a.onnx"]


def test_reads_take_regular_files_within_their_bound_and_never_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2000)
    cases = {
        fifo: "fifo: a FIFO, not a metrics file; it is not read",
        zero: "zero: a character device, not a metrics file; it is not read",
        big: "more than the 0.000953674 MiB a metrics file may hold",
        tmp_path: "a folder, not a metrics file",
    }
    for path, message in cases.items():
        began = time.monotonic()
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_bounded(path, 1000, "metrics file")
        assert time.monotonic() - began < 1
    for path in (fifo, zero):
        with pytest.raises(UserError, match="not a weights file"):
            require_regular(path, 10**9, "weights file")
    assert read_bounded(big, 2000, "metrics file") == b"x" * 2000
    with pytest.raises(FileNotFoundError):
        read_bounded(tmp_path / "missing", 10, "metrics file")


def test_json_that_python_cannot_take_is_one_line(tmp_path):
    for text in ("[" * 100_000, '{"epoch": ' + "9" * 5000 + "}", "{", "\xff"):
        path = tmp_path / "meta.json"
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(UserError, match=r"meta\.json: not (a checkpoint's meta\.json, not JSON|UTF-8 text)"):
            read_json(path, 10**6, "checkpoint's meta.json")


def test_folders_made_for_outputs_are_never_links(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"report/runs: a symbolic link, not a folder"):
        make_folders(out, "runs", "a")
    assert list(elsewhere.iterdir()) == []
    (out / "runs").unlink()
    assert make_folders(out, "runs", "a") == out / "runs" / "a" and (out / "runs" / "a").is_dir()


def test_outputs_are_refused_anywhere_inside_a_run_folder(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    (run / "checkpoints" / "best").symlink_to("step-00000001")
    (tmp_path / "into-run").symlink_to(run)
    for path in (
        run / "summary.json",
        run / "new.csv",
        run / "checkpoints" / "best" / "meta.json",
        run / "export" / "r-best.json",
        tmp_path / "into-run" / "p.json",  # a link into the run is the run
    ):
        assert run_folder_of(path) == run, path
        with pytest.raises(UserError, match=f"out=x: inside the run folder {run}, whose files belong to its run"):
            refuse_run_folder(path, "out=x")
    assert run_folder_of(tmp_path / "runs" / "p.csv") is None  # beside it is fine
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.yaml").write_text("not a run's\n")
    assert run_folder_of(tmp_path / "project" / "p.csv") is None  # a config.yaml alone makes no run folder
