#!/usr/bin/env bash
# Issue 10's GPU measurements in one call, on the full data set (under 9 minutes on one H100):
#   step      the training step of the recipe on synthetic data: eager and torch.compile (default
#             mode) through this project's engine, graph breaks, host waits, and a profile of 5
#             compiled steps (top 15 kernels printed, trace saved);
#   e2e-*     train.py end to end, eager, for GPU_BENCH_EPOCHS epochs, with data.pipeline=reference
#             (GPU_BENCH_WORKERS workers) and then data.pipeline=device: every epoch's training
#             images/s, evaluation and checkpoint seconds (metrics.jsonl), test top-1;
#   step-autotune  the step compiled in GPU_BENCH_MODES, each against an eager row of its own process;
#   best-budget  train.py recipe=GPU_BENCH_RECIPE train.budget=GPU_BENCH_BUDGET (8m) on the device
#             pipeline: the recipe's whole schedule fitted to the budget, its test top-1 at the end;
#   fast      train.py recipe=fast (the speedrun-style recipe) in bf16 with torch.compile, its data
#             on the GPU: the seconds of training to its final epoch, end to end, and its test top-1;
# then one table and a JSON (bench/gpu_report.py). A section that fails or runs out of its time
# share is a row saying so; the others keep their results. Sections run in this order so that the
# costly autotuning compiles get only the time left.
#
# Usage, from the repository root: bash bench/gpu.sh [DATA_ROOT] [OUT_DIR]
#   DATA_ROOT  folder holding cifar-100-python/ (default .gpudata: `python bench/stage_data.py join`)
#   OUT_DIR    gets <date>-<card>-fulldata.json, trace.json.gz, gpu.log (default $OUT, else /tmp/gpu-bench-out)
# Sizes, by environment variable (the defaults are the GPU run; tests/test_gpu_sh.py runs it on a CPU
# with a tiny recipe): GPU_BENCH_RECIPE=best GPU_BENCH_EPOCHS=8 GPU_BENCH_STEPS=30 GPU_BENCH_WARMUP=8
# GPU_BENCH_WORKERS=15 GPU_BENCH_MODES=max-autotune-no-cudagraphs,max-autotune (empty: no such
# section) GPU_BENCH_SECONDS=500 (the budget the sections share) GPU_BENCH_BUDGET=8m
# GPU_BENCH_SECTIONS=step,e2e,step-autotune (which sections run; best-budget and fast take calls of
# their own: bench/README.md) GPU_BENCH_FAST_ARGS= (more key=value for the fast run: the test's tiny
# sizes) GPU_BENCH_FAST_PRECISION=bf16 GPU_BENCH_FAST_COMPILE=true.
# The end-to-end runs are eager: compiling would add a minute or more per run to an 8-epoch run,
# and their speed is compared with the eager step of the same choices (ratio end to end / step).
set -uo pipefail
data=${1:-.gpudata}
out=${2:-${OUT:-/tmp/gpu-bench-out}}
recipe=${GPU_BENCH_RECIPE:-best}
epochs=${GPU_BENCH_EPOCHS:-8}
steps=${GPU_BENCH_STEPS:-30}
warmup=${GPU_BENCH_WARMUP:-8}
workers=${GPU_BENCH_WORKERS:-15}
modes=${GPU_BENCH_MODES-max-autotune-no-cudagraphs,max-autotune}
budget=${GPU_BENCH_SECONDS:-500}
train_budget=${GPU_BENCH_BUDGET:-8m}
sections=${GPU_BENCH_SECTIONS:-step,e2e,step-autotune}
fast_args=${GPU_BENCH_FAST_ARGS:-}
fast_precision=${GPU_BENCH_FAST_PRECISION:-bf16}
fast_compile=${GPU_BENCH_FAST_COMPILE:-true}
mkdir -p "$out"
work=$(mktemp -d /tmp/gpu-bench.XXXXXX)
exec > >(tee -a "$out/gpu.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH=$PWD

# section NAME CAP COMMAND...: run COMMAND with at most CAP seconds and no more than the budget
# has left; its exit status (124: timed out) or "skipped" goes to $work/NAME.rc for the report.
section() {
    local name=$1 cap=$2
    shift 2
    local left=$((budget - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 30)); then
        echo "== $name: skipped, $left s of the budget left"
        echo skipped >"$work/$name.rc"
        return
    fi
    echo "== $name (at most $limit s; $SECONDS s used so far)"
    timeout -k 10 "$limit" "$@"
    echo $? >"$work/$name.rc"
}

wants() { [[ ",$sections," == *",$1,"* ]]; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, torchvision, timm, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
echo "recipe=$recipe epochs=$epochs steps=$steps warmup=$warmup workers=$workers modes=$modes sections=$sections" \
    "train_budget=$train_budget data=$data work=$work"

if wants best-budget; then
    # The budget is the run's own limit; the section's cap only catches a run that overshoots it badly.
    seconds=$(python -c "from cifar100.config import parse_duration; print(round(parse_duration('b', '$train_budget')))")
    section best-budget $((seconds + 60)) python train.py "recipe=$recipe" "data.root=$data" data.download=false \
        "log.dir=$work/runs" name=best-budget data.pipeline=device "train.budget=$train_budget" \
        log.wandb.mode=disabled log.progress=false
fi
if wants fast; then
    # shellcheck disable=SC2086  # GPU_BENCH_FAST_ARGS is a list of key=value words
    section fast 590 python train.py recipe=fast "data.root=$data" data.download=false "log.dir=$work/runs" \
        name=fast "train.precision=$fast_precision" "train.compile=$fast_compile" log.wandb.mode=disabled \
        log.progress=false $fast_args
fi
wants step && section step 200 python -m cifar100 bench step "recipe=$recipe" "steps=$steps" "warmup=$warmup" \
    compile=default eager=false "profile=$work/trace.json.gz" "json=$work/step.json"
for pipeline in reference device; do
    wants e2e && section "e2e-$pipeline" 150 python train.py "recipe=$recipe" "data.root=$data" data.download=false \
        "log.dir=$work/runs" "name=e2e-$pipeline" "data.pipeline=$pipeline" "data.workers=$workers" \
        "train.epochs=$epochs" log.wandb.mode=disabled log.progress=false
done
if [ -n "$modes" ] && wants step-autotune; then
    section step-autotune "$budget" python -m cifar100 bench step "recipe=$recipe" "steps=$steps" "warmup=$warmup" \
        "compile=$modes" eager=false "json=$work/step-autotune.json"
fi

echo "== report ($SECONDS s used)"
[ -f "$work/trace.json.gz" ] && cp "$work/trace.json.gz" "$out/"
python bench/gpu_report.py "$work" "$out"
status=$?
exec >&- 2>&-
wait "$tee_pid"  # the log is complete before the script returns
exit $status
