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
# train.budget=auto (on the script's command line): the training plans to have ended
# SLURM_MARGIN_SECONDS (cifar100/training/budget.py) before the job's end. Slurm does not tell a job
# its --signal lead (22.05: neither scontrol show job, squeue nor the environment has it), and a
# --signal on sbatch's command line overrides the script's, so for such a run the warning is not the
# stop order: the first USR1 starts a watcher, and the training gets USR1 only once the job's end (as
# squeue reports it then) is AUTO_STOP_SECONDS away. A run that keeps to its plan has ended by then; a
# late one checkpoints then, the job is requeued and the restart continues the plan from that checkpoint.
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

# A late train.budget=auto run's time to checkpoint and requeue; less than the plan's margin
# (SLURM_MARGIN_SECONDS in cifar100/training/budget.py: tests/test_cluster.py checks), the rest of
# which is the run's room to end a little later than planned.
AUTO_STOP_SECONDS=20
budget_auto=0
for arg in "$@"; do
  case $arg in
    train.budget=auto) budget_auto=1 ;;
    train.budget=*) budget_auto=0 ;;  # the last one counts, as for the training
  esac
done

preempted=0 step="" watcher=""
# shellcheck disable=SC2317,SC2329  # run by the traps, as are the functions below
seconds_to_deadline() {  # until the job's end less AUTO_STOP_SECONDS; 0 when squeue does not say
  local end
  end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null) && end=$(date -d "$end" +%s 2>/dev/null) || end=0
  echo $(( end > 0 ? end - AUTO_STOP_SECONDS - $(date +%s) : 0 ))
}

# shellcheck disable=SC2317,SC2329
watch_deadline() {  # in the background: USR2 to the batch shell once the deadline has come (a look a minute)
  local left pause=""
  trap '[[ -z $pause ]] || kill "$pause" 2>/dev/null; exit 0' TERM
  while left=$(seconds_to_deadline) && (( left > 0 )); do
    sleep $(( left < 60 ? left : 60 )) & pause=$!
    wait "$pause"
  done
  kill -USR2 $$
}

# shellcheck disable=SC2317,SC2329
on_usr1() {
  [[ -z $watcher ]] || return 0  # held back already: the watcher decides
  if (( budget_auto && $(seconds_to_deadline) > 0 )); then
    echo "USR1 at $(date -Is): held back for train.budget=auto until $AUTO_STOP_SECONDS s before the time limit"
    watch_deadline &
    watcher=$!
    return 0
  fi
  stop_training "USR1 at $(date -Is)"
}

# shellcheck disable=SC2317,SC2329
stop_training() {  # $1: why, for the log
  (( preempted )) && return 0  # pass it on once: a second signal makes the training exit without saving
  preempted=1
  echo "$1: asking the training to checkpoint and stop"
  kill -USR1 "$step" 2>/dev/null || true
}
trap on_usr1 USR1
trap 'stop_training "$AUTO_STOP_SECONDS s before the time limit, at $(date -Is)"' USR2

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
if [[ -n $watcher ]]; then kill "$watcher" 2>/dev/null || true; fi

if (( preempted && status != 0 )); then
  echo "training stopped after USR1 (srun status $status); requeueing job $job_ref"
  scontrol requeue "$job_ref"
  exit 0
fi
echo "job $job_ref ended with status $status at $(date -Is)"
exit "$status"
