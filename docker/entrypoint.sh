#!/usr/bin/env bash
# PID 1 of the image: runs its arguments (the `accelerate launch ...` line) as one job and hands
# it the signals a container gets. `docker stop`, `docker kill -s`, and a Kubernetes pod deletion
# signal PID 1 only, and a PID 1 without a handler ignores them: without this script SIGTERM never
# reached the training processes and the grace period ended in SIGKILL, with no checkpoint.
#
# The job runs in its own process group; TERM, INT and USR1 sent to this script go to every
# process of that group, as Slurm and a terminal deliver them. The training processes each get
# the signal once, checkpoint and stop (143, or 130 for INT); their loader workers ignore it.
# The launcher ignores them too: `accelerate launch` with one process would die at once and
# leave its training process behind, and torchrun would forward a second copy ("exit now").
# This script waits for the job and exits with its status. Grace period: docker stop -t 60,
# docker run --stop-timeout 60, Kubernetes terminationGracePeriodSeconds: 60 (the default 10 s
# and 30 s are short for a large model's checkpoint; see launch/README.md).
set -u

export PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT  # torchrun keeps TERM, INT and USR1 ignored, as inherited
trap '' TERM INT USR1
# The image's defaults (data.root=/data log.dir=/runs, in its ENTRYPOINT) yield to the same keys given
# to `docker run`: the training refuses a key given twice.
args=()
for ((i = 1; i <= $#; i++)); do
  arg=${!i}
  case $arg in
    data.root=* | log.dir=*)
      for later in "${@:i+1}"; do
        [[ $later == "${arg%%=*}="* ]] && continue 2
      done
      ;;
  esac
  args+=("$arg")
done
setsid "${args[@]}" &  # not a group leader, so setsid execs in place: $! is the new group's id
job=$!

# shellcheck disable=SC2329  # run by the traps below
forward() { kill "-$1" -- "-$job" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1

# `wait` returns early whenever a trap runs: wait again until the job has really ended.
while :; do
  wait "$job"
  status=$?
  kill -0 "$job" 2>/dev/null || break
done
exit "$status"
