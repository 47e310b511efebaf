#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call on a lent GPU (about 8 minutes on one H100).
# Usage, from the repository root: bash bench/gpu.sh [DATA_ROOT]
# DATA_ROOT defaults to .gpudata, a subset made by `python bench/make_gpu_subset.py ../shared/data .gpudata`
# (the whole dataset is larger than what travels to a lent machine). JSON goes to $OUT (or /tmp).
set -uo pipefail
data=${1:-.gpudata}
out=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, torchvision, timm, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"
echo "== step: recipe=best, synthetic data"
python -m cifar100 bench step recipe=best steps=30 warmup=8 json="$out/step.json"
echo "== data: recipe=best (AutoAugment per sample), then crop+flip only"
python -m cifar100 bench data recipe=best data.root="$data" data.workers=15 batches=40 json="$out/data.json"
python -m cifar100 bench data recipe=best data.root="$data" data.workers=15 augment.autoaugment=none batches=40 json="$out/data_noaa.json"
common=(recipe=best "data.root=$data" log.dir=/tmp/runs train.epochs=3 data.workers=15 log.wandb.mode=disabled log.progress=false sched.warmup_epochs=1)
echo "== checkpoint stall: recipe=best"
python -m cifar100 bench checkpoint recipe=best log.dir=/tmp/runs json="$out/checkpoint.json"
echo "== end to end: recipe=best on the subset, eager then compiled"
[ "${SKIP_E2E:-0}" = 1 ] && exit 0
python train.py "${common[@]}" name=e2e 2>&1 | grep -E "^(run folder|epoch|done)"
python train.py "${common[@]}" name=e2e-compile train.compile=true 2>&1 | grep -E "^(run folder|epoch|done)"
python train.py "${common[@]}" name=e2e-device-compile data.pipeline=device train.compile=true 2>&1 | grep -E "^(epoch|done)"
for run in e2e e2e-compile e2e-device-compile; do cp "/tmp/runs/$run/metrics.jsonl" "$out/$run.jsonl"; done
echo "== step at batch 1024"
python -m cifar100 bench step recipe=best data.batch_size=1024 steps=20 warmup=5 compile=false json="$out/step-1024.json"
