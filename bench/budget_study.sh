#!/usr/bin/env bash
# recipe=cpu's model at wall-clock budgets of 2.5, 5 and 10 minutes (BENCHMARKS.md), each two ways
# side by side, started together with one CPU thread each so both see the same machine:
#   fitted   python train.py recipe=cpu train.budget=B   (the schedule laid over what fits in B)
#   stopped  the 11-epoch recipe it replaced (bench/cpu-2026-11-28.yaml), stopped by SIGTERM at B,
#            what PyTorch Lightning's max_time does; its last checkpoint is then scored by cifar100 eval
# Usage, from the repository root: bash bench/budget_study.sh DATA_ROOT OUT_DIR [SECONDS ...]
set -euo pipefail
data=${1:?usage: bash bench/budget_study.sh DATA_ROOT OUT_DIR [SECONDS ...]}
out=${2:?usage: bash bench/budget_study.sh DATA_ROOT OUT_DIR [SECONDS ...]}
shift 2
budgets=("$@")
[ ${#budgets[@]} -gt 0 ] || budgets=(150 300 600)
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
mkdir -p "$out"
common=("data.root=$data" "log.dir=$runs" log.progress=false log.wandb.mode=disabled train.threads=1)
for b in "${budgets[@]}"; do
  uptime > "$out/load-$b-before.txt"
  python train.py recipe=cpu "train.budget=${b}s" "name=fit-$b" "${common[@]}" > "$out/fit-$b.log" 2>&1 &
  fitted=$!
  # The stopped run gets its SIGTERM at B seconds after its start, as a time limit would send it.
  timeout -s TERM "$b" python train.py recipe=bench/cpu-2026-11-28.yaml "name=stop-$b" "${common[@]}" \
    > "$out/stop-$b.log" 2>&1 || true
  wait "$fitted"
  uptime > "$out/load-$b-after.txt"
  python -m cifar100 eval "run=$runs/stop-$b" checkpoint=last > "$out/stop-$b-eval.log" 2>&1
  cp "$runs/fit-$b/summary.json" "$out/fit-$b-summary.json"
  cp "$runs/fit-$b/metrics.jsonl" "$out/fit-$b-metrics.jsonl"
  cp "$runs/stop-$b/metrics.jsonl" "$out/stop-$b-metrics.jsonl"
  cp "$runs/stop-$b"/eval-*.json "$out/stop-$b-eval.json"
done
python - "$out" "${budgets[@]}" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| budget | fitted: test top-1, epochs, ended at | stopped: test top-1 of its last checkpoint, epochs done |")
print("|---|---|---|")
for b in sys.argv[2:]:
    fit = json.loads((out / f"fit-{b}-summary.json").read_text())
    stop = json.loads((out / f"stop-{b}-eval.json").read_text())
    done = sum(1 for _ in (out / f"stop-{b}-metrics.jsonl").open())
    plan = fit["plan"]
    print(f"| {int(b) / 60:g} min | {fit['final_test_top1']:.2%}, {plan['steps'] / 195:.2f} epochs, "
          f"{plan['ended_seconds']:.0f} s | {stop['splits']['test']['top1']:.2%}, {done} of 11 epochs |")
PY
