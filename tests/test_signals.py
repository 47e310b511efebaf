"""Stops as real systems send them, to real process groups with two loader workers each.

A signal to the whole process group (`kill -TERM -- -PGID`, GNU `timeout`), Ctrl-C typed into
a real terminal with the progress bars on, `docker stop` to the image's PID 1, and a launch
whose processes never joined one job. Every stop must end in one line, no traceback, a complete
checkpoint, no process left behind, and a resume equal to the uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clean_environ, overridden, shared_folder
from test_cluster import dockerfile
from test_resume import ONE, finish, metrics, start, wait_for

pytestmark = pytest.mark.slow

WORKERS = ("data.workers=2", "data.pipeline=reference", "train.checkpoint_every_steps=0")
EPOCH_1 = Path("checkpoints") / "step-00000008" / "COMPLETE"  # 8 steps per smoke epoch
# One thread, as `accelerate launch` gives each process: the image's launch then trains the same
# numbers as `python train.py`, and four engineers' tests share two cores.
ENV = {"OMP_NUM_THREADS": "1"}


def args(real_data, log_dir, name, *extra) -> list[str]:
    return overridden(
        ["recipe=smoke", f"data.root={real_data}", f"log.dir={log_dir}", f"name={name}", "train.epochs=3", *WORKERS],
        extra,
    )


@pytest.fixture(scope="session")
def reference(real_data, tmp_path_factory):
    """The uninterrupted run every stopped and resumed run must equal (trained once per session)."""
    log = shared_folder(
        tmp_path_factory, "signals-reference", lambda log: finish(ONE, args(real_data, log, "whole"), ENV)
    )
    return metrics(log / "whole")


def group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def assert_group_ends(pgid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while group(pgid):
        assert time.monotonic() < deadline, f"left behind: {group(pgid)}"
        time.sleep(0.2)


def wait_for_workers(pgid: int, proc: subprocess.Popen) -> None:
    """The main process and both loader workers are up: the signal will reach all three."""
    deadline = time.monotonic() + 60
    while len(group(pgid)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the loader workers never started"
        time.sleep(0.05)


def assert_clean_stop(err: str, run: Path, line: str) -> None:
    """One line saying how to continue, no traceback, and a complete checkpoint past epoch 1."""
    assert "Traceback" not in err, err[-3000:]
    assert line in err.strip().splitlines()[-1] and err.count(line) == 1, err[-3000:]
    assert "continue with the same command plus resume=auto" in err
    last = (run / "checkpoints" / "last").resolve()
    assert (last / "COMPLETE").is_file() and last.name >= "step-00000008"


def assert_resumes_exactly(real_data, log_dir, name, reference, launcher=ONE) -> None:
    out = finish(launcher, args(real_data, log_dir, name, "resume=auto"), ENV)
    assert "resuming" in out.stdout
    assert metrics(log_dir / name) == reference


def test_sigterm_to_the_process_group_stops_with_a_checkpoint(tmp_path, real_data, reference):
    """`kill -TERM -- -PGID` of a `setsid` run: the main process and both loader workers get it."""
    proc = start(ONE, args(real_data, tmp_path, "pg"), ENV)  # start_new_session: its own session and group
    wait_for(tmp_path / "pg" / EPOCH_1, proc)
    wait_for_workers(proc.pid, proc)
    subprocess.run(["kill", "-TERM", "--", f"-{proc.pid}"], check=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert_clean_stop(err, tmp_path / "pg", "preempted: stopped by SIGTERM")
    assert_group_ends(proc.pid)
    assert_resumes_exactly(real_data, tmp_path, "pg", reference)


def test_gnu_timeout_stops_the_run_with_a_checkpoint(tmp_path, real_data, reference):
    """`timeout` sends SIGTERM to the command and to its whole process group when its timer fires.
    The timer fires by SIGALRM; the test sends that SIGALRM once epoch 1 is saved, instead of
    guessing a duration on a shared machine."""
    proc = start(("timeout", "600", *ONE), args(real_data, tmp_path, "to"), ENV)
    wait_for(tmp_path / "to" / EPOCH_1, proc)
    wait_for_workers(proc.pid, proc)  # timeout leads its own group: timeout, python, 2 workers
    proc.send_signal(signal.SIGALRM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 124, err[-3000:]  # timeout's status for "timed out"; it waited for the run
    assert_clean_stop(err, tmp_path / "to", "preempted: stopped by SIGTERM")
    assert_group_ends(proc.pid)
    assert_resumes_exactly(real_data, tmp_path, "to", reference)


class Terminal:
    """One command on a real pseudo-terminal that is its controlling terminal, as a shell in a terminal
    window starts it: Ctrl-C is the byte the keyboard sends, and the terminal's line discipline turns it
    into SIGINT for the foreground process group (the command and its loader workers)."""

    def __init__(self, tmp_path: Path, command: list[str]):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        env = {**clean_environ(), "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color", **ENV}
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.master, self.pid, self.chunks = master, self.proc.pid, []
        self.closing = threading.Event()
        # Read all the time: a terminal whose output nobody reads blocks the program writing to it.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        # Never blocked inside read(): a read in progress holds the terminal open, so closing it would
        # hang it up only once the program next wrote something (seconds later, or never).
        while not self.closing.is_set():
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO once every writer has gone
                return
            if not data:
                return
            self.chunks.append(data)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def exit_status(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(self.screen()[-3000:]) from None

    def screen(self) -> str:
        text = b"".join(self.chunks).decode(errors="replace")
        # Everything written, each progress-bar redraw (a carriage return) on a line of its own.
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def poll(self) -> int | None:
        """As Popen.poll: None while the command runs."""
        return self.proc.poll()

    def communicate(self) -> str:
        return self.screen()

    def close(self) -> None:
        """Close the terminal, as closing its window does: the kernel hangs it up at once, and SIGHUP
        goes to its controlling process (the command, which leads the session)."""
        if self.master >= 0:
            self.closing.set()
            self.reader.join()
            os.close(self.master)
            self.master = -1


@pytest.fixture
def terminal(tmp_path):
    opened = []

    def open_terminal(command: list[str]) -> Terminal:
        opened.append(Terminal(tmp_path, command))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


def test_ctrl_c_in_a_terminal_stops_with_a_checkpoint(tmp_path, real_data, reference, terminal):
    term = terminal([*ONE, *args(real_data, tmp_path, "cc", "log.progress=true")])
    wait_for(tmp_path / "cc" / EPOCH_1, term)
    wait_for_workers(term.pid, term)  # the loader workers share the terminal's foreground group
    term.ctrl_c()  # SIGINT to the terminal's foreground process group, as a keyboard sends it
    status, screen = term.exit_status(), term.screen()
    assert status == 130, screen[-3000:]
    assert "epoch 2:" in screen or "epoch 3:" in screen or "epoch 4:" in screen  # the progress bars were on
    assert_clean_stop(screen, tmp_path / "cc", "interrupted: stopped by SIGINT")
    assert_group_ends(term.pid)
    assert_resumes_exactly(real_data, tmp_path, "cc", reference)


def test_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, real_data, terminal):
    """Presses within half a second of the first count as one (a launcher's forwarded copy looks the
    same), and Python runs a handler only between operations: a long backward pass holds every press
    made during it. So the key is pressed every 0.6 s, as an impatient user does, until the run ends."""
    # One slow step per epoch (a wider model on a 400-image batch): the clean stop would take seconds.
    term = terminal(
        [
            *ONE,
            *args(
                real_data,
                tmp_path,
                "cc2",
                "train.epochs=20",
                "model.name=cifarnet_l",
                "data.batch_size=400",
                "log.progress=true",
            ),
        ]
    )
    wait_for(tmp_path / "cc2" / "checkpoints" / "best" / "COMPLETE", term)
    for _ in range(40):
        term.ctrl_c()
        time.sleep(0.6)
        if term.poll() is not None:
            break
    status, screen = term.exit_status(timeout=60), term.screen()
    assert status == 130 and "interrupted:" not in screen and "Traceback" not in screen, screen[-3000:]
    # Epoch 2's clean stop never wrote its checkpoint: only epoch 1's is there.
    assert sorted(p.name for p in (tmp_path / "cc2" / "checkpoints").glob("step-*")) == ["step-00000001"]
    assert_group_ends(term.pid)  # the workers notice their parent is gone and end


def test_sighup_to_the_process_group_stops_like_sigterm(tmp_path, real_data, reference):
    """What a shell sends its jobs when its terminal goes away: SIGHUP to each job's whole group."""
    proc = start(ONE, args(real_data, tmp_path, "hup"), ENV)
    wait_for(tmp_path / "hup" / EPOCH_1, proc)
    wait_for_workers(proc.pid, proc)
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 129, err[-3000:]
    assert_clean_stop(err, tmp_path / "hup", "interrupted: stopped by SIGHUP")
    assert_group_ends(proc.pid)
    assert_resumes_exactly(real_data, tmp_path, "hup", reference)


def test_closing_the_terminal_stops_with_a_checkpoint(tmp_path, real_data, reference, terminal):
    """The terminal's window is closed mid-epoch: the kernel hangs up the run's terminal (SIGHUP to the
    run, which leads its session), and every later write to it fails; the run still writes its stop
    checkpoint and ends."""
    # A step checkpoint early in epoch 2 says the run is inside it (past epoch 1's stop check) when the window closes.
    term = terminal([*ONE, *args(real_data, tmp_path, "closed", "train.checkpoint_every_steps=9")])
    wait_for(tmp_path / "closed" / "checkpoints" / "step-00000009" / "COMPLETE", term)
    wait_for_workers(term.pid, term)
    term.close()
    assert term.exit_status() == 129  # SIGHUP's status: the stop line went nowhere, without an error
    assert_group_ends(term.pid, timeout=120)
    last = (tmp_path / "closed" / "checkpoints" / "last").resolve()
    assert (last / "COMPLETE").is_file() and last.name > "step-00000009"  # a stop checkpoint after the hangup
    assert_resumes_exactly(real_data, tmp_path, "closed", reference)


def image_command() -> list[str]:
    """The image's ENTRYPOINT exactly as docker/Dockerfile says, with the image's WORKDIR as this checkout."""
    steps = dockerfile()
    workdir = [a for op, a in steps if op == "WORKDIR"][-1].rstrip("/") + "/"
    entry = json.loads(next(a for op, a in steps if op == "ENTRYPOINT"))
    assert [a for op, a in steps if op == "CMD"], "the image has a default CMD"
    return [str(ROOT) + "/" + part[len(workdir) :] if part.startswith(workdir) else part for part in entry]


def pid_1_of(unshare: subprocess.Popen) -> int:
    """The host pid of the new namespace's PID 1 (unshare --fork's child)."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    deadline = time.monotonic() + 30
    while not children.read_text().split():
        assert unshare.poll() is None and time.monotonic() < deadline, unshare.communicate()
        time.sleep(0.05)
    return int(children.read_text().split()[0])


def test_docker_stop_reaches_the_training_through_the_entrypoint_as_pid_1(tmp_path, real_data, reference):
    """`docker stop` sends SIGTERM to PID 1 of the container only. Here PID 1 of a new PID namespace
    runs the image's exact entrypoint command (arguments as `docker run IMAGE ...` gives them)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a new PID namespace needs root and unshare (util-linux)")
    container = ("unshare", "--pid", "--fork", "--mount-proc", *image_command())
    proc = start(container, args(real_data, tmp_path, "box"), ENV)
    init = pid_1_of(proc)
    wait_for(tmp_path / "box" / EPOCH_1, proc)
    os.kill(init, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # The training stopped with 143 and the entrypoint passes the launcher's status on: accelerate 1.16
    # (what `pip install` brings now) exits 143 itself on SIGTERM; older releases reported 1.
    assert proc.returncode in (143, 1), err[-3000:]
    assert_clean_stop(err, tmp_path / "box", "preempted: stopped by SIGTERM")
    assert not group(proc.pid) and not Path(f"/proc/{init}").exists()  # the namespace ended with its PID 1
    assert_resumes_exactly(real_data, tmp_path, "box", reference, launcher=container)


def test_a_multi_process_launch_that_forms_no_job_is_refused(tmp_path, real_data):
    """`accelerate launch --multi_gpu` without CUDA starts processes that each run alone; they must not train."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the processes would join one job")
    env = {k: v for k, v in clean_environ().items() if k != "ACCELERATE_USE_CPU"}
    out = subprocess.run(
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "train.py",
            *args(real_data, tmp_path / "runs", "x")[:4],
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = (
        "error: the launcher started 2 processes (WORLD_SIZE=2) but they did not join one job: each would train "
        "alone (1 process(es) in its group), as Accelerate does where CUDA is unavailable. For CPU processes "
        "set ACCELERATE_USE_CPU=1"
    )
    # torchrun's report: each rank's exit status. Rank 0 refuses with 2 and says why; rank 1 waits for it
    # to, and torchrun's agent then stops it with SIGTERM (-15), or it refuses with 2 as well.
    exits = dict(re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", out.stderr))
    assert exits.get("0") == "2" and exits.get("1") in ("2", "-15"), out.stderr[-3000:]
    assert out.stderr.count(line) == 1, out.stderr[-3000:]  # said once, by rank 0
    assert out.returncode != 0 and not (tmp_path / "runs").exists()  # no folder made
