# shellcheck shell=bash
# The batch-shell half of train.sbatch and multinode.sbatch, which source it from the checkout:
# it names the run, starts launch/slurm/node.sh once per node with srun, and handles preemption.
#
# Run folder: <log.dir>/<job name>-<job id> with resume=auto, so a requeued job (same id) continues
# the same folder from its newest checkpoint; the first start finds none and starts fresh. Both
# come before the user's arguments unless those give name=... or resume=... (a key given twice is
# refused by train.py).
#
# Preemption: Slurm sends USR1 to this shell only (--signal=B:USR1@SECONDS, or by hand
# `scancel --signal=USR1 --batch JOBID`). The trap passes USR1 to srun, which delivers it to every
# process of the job step on every node; node.sh made the launchers ignore it, so each training
# process gets it once: all ranks agree at the next step, write one checkpoint and exit 143
# (torchrun reports that as a failure, so srun ends non-zero). This shell then requeues the job:
# it waits in the queue again (about 2 min at Slurm's default cred_expire) and restarts with
# SLURM_RESTART_COUNT=1, 2, ... Logs: --output=logs/%x-%j.out with --open-mode=append, one file
# per job id holding every restart. An array task (sweep.sbatch) is <array job id>_<task>: that is the
# id it prints and requeues, so a preempted task is requeued alone.
#
# Inputs: $0 (the sbatch script, for the dry run), srun_opts and in_container (arrays, optional),
# and the script's arguments. Outside Slurm, `--dry-run ARGS` prints what each node would run.

# run_args: name=$1 and resume=auto, each unless the arguments after it give its key, then those arguments.
with_defaults() {
  local arg own=" "
  for arg in "${@:2}"; do
    case $arg in name=* | resume=*) own+="${arg%%=*} " ;; esac
  done
  run_args=()
  [[ $own == *" name "* ]] || run_args+=("name=$1")
  [[ $own == *" resume "* ]] || run_args+=(resume=auto)
  run_args+=("${@:2}")
}

if [[ ${1:-} == --dry-run ]]; then
  shift
  # Nodes and GPUs as the script's #SBATCH lines ask (SLURM_NNODES / GPUS_PER_NODE override them).
  header() { sed -n "s/^#SBATCH --$1=\([0-9]*\).*/\1/p" "$0" | head -n1; }
  export SLURM_NNODES=${SLURM_NNODES:-$(header nodes)} HEAD_ADDR=${HEAD_ADDR:-FIRST_NODE} MAIN_PORT=${MAIN_PORT:-PORT}
  [[ -n ${CPU_PROCS:-} ]] || export GPUS_PER_NODE=${GPUS_PER_NODE:-$(header gpus-per-node)}
  with_defaults "${SLURM_JOB_NAME:-cifar100}-JOBID" "$@"
  exec launch/slurm/node.sh --dry-run "${run_args[@]}"
fi

job_ref=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
job_ref=${job_ref:-$SLURM_JOB_ID}
echo "job $job_ref (${SLURM_JOB_NAME}) start $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST at $(date -Is)"
HEAD_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # per job: jobs sharing a node do not collide
export HEAD_ADDR MAIN_PORT

preempted=0 step=""
# shellcheck disable=SC2317,SC2329  # run by the trap below
on_usr1() {
  (( preempted )) && return 0  # pass it on once: a second signal makes the training exit without saving
  preempted=1
  echo "USR1 at $(date -Is): asking the training to checkpoint and stop"
  kill -USR1 "$step" 2>/dev/null || true
}
trap on_usr1 USR1

with_defaults "${SLURM_JOB_NAME}-${SLURM_JOB_ID}" "$@"
# --kill-on-bad-exit: a node that fails takes the others down instead of leaving them in a collective.
# shellcheck disable=SC2154  # srun_opts and in_container are set by the sbatch script
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${srun_opts[@]}" "${in_container[@]}" \
  launch/slurm/node.sh "${run_args[@]}" &
step=$!
# `wait` returns early when the trap runs; wait again until srun has really ended.
while kill -0 "$step" 2>/dev/null; do wait "$step" || true; done
status=0
wait "$step" || status=$?

if (( preempted && status != 0 )); then
  echo "training stopped after USR1 (srun status $status); requeueing job $job_ref"
  scontrol requeue "$job_ref"
  exit 0
fi
echo "job $job_ref ended with status $status at $(date -Is)"
exit "$status"
