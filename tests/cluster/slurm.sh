#!/usr/bin/env bash
# A real Slurm on this machine for the tests: munged, slurmctld and slurmd run directly (no systemd),
# with config, state, spool, logs and sockets under DIR.
#
#   tests/cluster/slurm.sh start DIR [HOSTS]  start and wait until every node is idle
#       HOSTS=1 (default): one node, this machine as `hostname -s`, CPUs=2.
#       HOSTS=2: two hosts, node1 and node2, each in its own network namespace with its own
#         address (10.x on a veth pair between the two namespaces), hostname and /etc/hosts
#         (private UTS and mount namespaces), CPUs=1 each; slurmctld runs on node1.
#   tests/cluster/slurm.sh run DIR CMD...     run CMD where the cluster is reachable (on node1 for
#                                             HOSTS=2) with SLURM_CONF set: sbatch, squeue, scontrol, ...
#   tests/cluster/slurm.sh stop DIR           stop the daemons and remove the namespaces.
#
# Needs root, Debian's slurm-wlm and munge (.ci/run installs them), and for HOSTS=2 `ip netns`.
# No accounting, no cgroups: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none. Ports (and
# for HOSTS=2 namespace names and subnet) are picked per start, so two clusters do not collide.
# Requeued jobs wait AuthInfo's cred_expire before they may start again: 10 s here, 120 s by default.
# slurmctld logs at debug2, so its log says when it tested the jobs' time limits (every 30 s) and
# when it sent a job its --signal warning.
set -euo pipefail

cmd=${1:?usage: slurm.sh start|run|stop DIR ...}
dir=${2:?usage: slurm.sh start|run|stop DIR ...}
shift 2

# Run "$@" as host $1 of a HOSTS=2 cluster: its network namespace, hostname and /etc/hosts.
on_host() {
  local host=$1
  shift
  # shellcheck disable=SC2016  # expanded by the inner sh
  nsenter --net="/run/netns/$prefix-$host" unshare --mount --uts --propagation private \
    sh -c 'mount --bind "$0/hosts" /etc/hosts && hostname "$1" && shift && exec "$@"' "$dir" "$host" "$@"
}

clients() {  # run "$@" as a Slurm client of this cluster
  if [[ $hosts == 2 ]]; then on_host node1 "$@"; else "$@"; fi
}

stop() {
  local pidfile pid
  for pidfile in "$dir"/slurmd*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(<"$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do  # gone, or a zombie where nothing reaps daemons
      [[ $(ps -o stat= -p "$pid") == [^Z]* ]] || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  if [[ ${hosts:-1} == 2 ]]; then
    ip netns del "$prefix-node1" 2>/dev/null || true
    ip netns del "$prefix-node2" 2>/dev/null || true
  fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

network() {  # two namespaces joined by a veth pair, 10.<a>.<b>.1 and .2
  local tag=$(($$ % 25000)) i subnet
  prefix=c100-$tag
  subnet=10.$((100 + tag / 250)).$((tag % 250))
  printf '127.0.0.1 localhost\n%s.1 node1\n%s.2 node2\n' "$subnet" "$subnet" > "$dir/hosts"
  ip link add "c1v$tag-1" type veth peer name "c1v$tag-2"
  for i in 1 2; do
    ip netns add "$prefix-node$i"
    ip link set "c1v$tag-$i" netns "$prefix-node$i"
    ip -n "$prefix-node$i" addr add "$subnet.$i/24" dev "c1v$tag-$i"
    ip -n "$prefix-node$i" link set "c1v$tag-$i" up
    ip -n "$prefix-node$i" link set lo up
  done
}

write_conf() {
  local nodes ctld
  if [[ $hosts == 2 ]]; then
    ctld=node1 nodes="NodeName=node[1-2] CPUs=1 State=UNKNOWN"
  else
    ctld=$(hostname -s)
    nodes="NodeName=$ctld CPUs=2 State=UNKNOWN"
  fi
  cat > "$dir/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$ctld
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmctldDebug=debug2
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
$nodes
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  hosts=${1:-1} prefix=""
  trap '(( $? == 0 )) || stop' EXIT  # a failed start leaves nothing running
  mkdir -p "$dir"/{state,munge}
  chmod 700 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1k count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
  [[ $hosts == 2 ]] && network
  printf 'hosts=%s\nprefix=%s\n' "$hosts" "$prefix" > "$dir/cluster.env"
  write_conf
  export SLURM_CONF=$dir/slurm.conf
  if [[ $hosts == 2 ]]; then
    mkdir -p "$dir/spool-node1" "$dir/spool-node2"
    on_host node1 slurmctld -f "$SLURM_CONF"
    on_host node1 slurmd -f "$SLURM_CONF"
    on_host node2 slurmd -f "$SLURM_CONF"
  else
    mkdir -p "$dir/spool-$(hostname -s)"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
  fi
  for _ in $(seq 150); do
    if [[ $(clients sinfo -h -N -o %t 2>/dev/null | grep -cx idle) == "$hosts" ]]; then
      echo "slurm up under $dir: $(clients sinfo -h -N -o '%N %c CPUs %t' | paste -sd, -)"
      return 0
    fi
    sleep 0.2
  done
  echo "slurm did not come up; the logs under $dir end with:" >&2
  tail -n 15 "$dir"/*.log >&2 || true
  return 1
}

if [[ $cmd != start ]]; then
  # shellcheck source=/dev/null
  source "$dir/cluster.env"
  export SLURM_CONF=$dir/slurm.conf
fi
case $cmd in
  start) start "$@" ;;
  run) clients "$@" ;;
  stop) stop ;;
  *) echo "usage: slurm.sh start|run|stop DIR ..." >&2; exit 2 ;;
esac
