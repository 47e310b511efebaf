#!/usr/bin/env bash
# CPU recipes side by side, end to end, one after the other and alternating, ROUNDS times (BENCHMARKS.md):
#   bash bench/cpu_recipes.sh ../shared/data bench/results/<date>-cpu-recipes ROUNDS RECIPE...
#   bash bench/cpu_recipes.sh ../shared/data OUT 2 bench/cpu-2026-11-28.yaml cpu
# Run it on a quiet machine: a budget recipe's epochs, and so its accuracy, follow the machine's speed.
set -euo pipefail
usage="usage: bash bench/cpu_recipes.sh DATA_ROOT OUT_DIR ROUNDS RECIPE..."
data=${1:?$usage}
out=${2:?$usage}
rounds=${3:?$usage}
shift 3
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for recipe in "$@"; do
    tag=$(basename "$recipe" .yaml)-$round
    /usr/bin/time -v -o "$out/$tag-time.txt" \
      python train.py "recipe=$recipe" "data.root=$data" "log.dir=$runs" "name=$tag" log.progress=false
    uptime > "$out/$tag-uptime.txt"  # load averages over the run: the run's own ~2 when nothing else ran
    cp "$runs/$tag/metrics.jsonl" "$out/$tag-metrics.jsonl"
    cp "$runs/$tag/summary.json" "$out/$tag-summary.json"
    python - "$out/$tag-summary.json" "$out/$tag-time.txt" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
wall = next(line.split(": ", 1)[1].strip() for line in open(sys.argv[2]) if "Elapsed (wall clock)" in line)
ended = summary.get("plan", {}).get("ended_seconds")
print(f"{summary['name']}: final test top-1 {summary['final_test_top1']:.2%} (epoch {summary['epochs']}), "
      f"wall {wall}, summary.json at {ended} s")
PY
  done
done
