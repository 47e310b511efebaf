#!/usr/bin/env bash
# One node's share of a training job. srun runs this once per node (train.sbatch, multinode.sbatch);
# it runs `accelerate launch`, which starts one training process per GPU of the node:
#
#   accelerate launch --config_file launch/accelerate/<one-gpu|one-node|multi-node>.yaml \
#     --num_machines NODES --num_processes NODES*PER_NODE --machine_rank SLURM_NODEID \
#     --main_process_ip HEAD_ADDR --main_process_port MAIN_PORT [--rdzv_backend c10d] train.py ARGS
#
# From Slurm: SLURM_NNODES, SLURM_NODEID (this node's rank: srun starts one task per node, so it
# equals SLURM_PROCID), SLURM_GPUS_ON_NODE. From the batch script: HEAD_ADDR (the first node) and
# MAIN_PORT. Optional: GPUS_PER_NODE (default: the GPUs Slurm gave this node, else nvidia-smi),
# CPU_PROCS=N (CPU mode, for tests: N processes per node on CPU over gloo, ACCELERATE_USE_CPU=1).
#
#   launch/slurm/node.sh --dry-run ARGS   prints the command, world size and per-process batch.
set -euo pipefail
cd "$(dirname "$0")/../.."

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi

nodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
if [[ -n ${CPU_PROCS:-} ]]; then
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  per_node=$CPU_PROCS device=cpu
else
  per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}}
  device=gpu
fi
if ! (( per_node > 0 )); then
  echo "error: no GPU on $(hostname -s): set GPUS_PER_NODE, or CPU_PROCS=N to train on CPU" >&2
  exit 2
fi
world=$((nodes * per_node))

cmd=(accelerate launch --num_machines "$nodes" --num_processes "$world")
if (( nodes > 1 )); then
  # --rdzv_backend must be on the command line: accelerate's own default ("static") wins over the file.
  cmd+=(--config_file launch/accelerate/multi-node.yaml --machine_rank "$node_rank"
        --main_process_ip "${HEAD_ADDR:?HEAD_ADDR: the first node of the job}"
        --main_process_port "${MAIN_PORT:-29500}" --rdzv_backend c10d)
elif (( per_node > 1 )); then
  cmd+=(--config_file launch/accelerate/one-node.yaml --main_process_port "${MAIN_PORT:-29500}")
else
  cmd+=(--config_file launch/accelerate/one-gpu.yaml)
fi
cmd+=(train.py "$@")

if (( dry_run )); then
  # The resolved config says the batch; `cifar100 show` also rejects a bad key before anything is queued.
  resolved=$(python -m cifar100 show "$@")
  read -r batch accum < <(python -c 'import sys, yaml; c = yaml.safe_load(sys.argv[1])
print(c["data"]["batch_size"], c["train"]["grad_accum"])' "$resolved")
  echo "world size $world: $nodes node(s) x $per_node process(es) on $device"
  if (( batch % (world * accum) )); then
    echo "error: data.batch_size=$batch is not divisible by processes x train.grad_accum = $world x $accum" >&2
    exit 2
  fi
  echo "per-process batch $((batch / world / accum)) = data.batch_size $batch / $world processes / train.grad_accum $accum"
  printf 'node %s runs:' "$node_rank"
  printf ' %q' "${cmd[@]}"
  echo
  if (( nodes > 1 )); then echo "(node i of 0..$((nodes - 1)) runs the same line with --machine_rank i)"; fi
  exit 0
fi

# Slurm delivers a signal sent to the job step to every process of the step, this launcher and
# the training processes alike. The training processes must each get it exactly once (a second
# one means "exit now"), so the launcher ignores USR1 and TERM instead of forwarding them; the
# training processes install their own handlers. Ctrl-C still reaches the launcher.
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
trap '' USR1 TERM
exec "${cmd[@]}"
