#!/usr/bin/env bash
# recipe=cpu (a 10-minute budget) against the 11-epoch recipe it replaced, end to end, one after the other (BENCHMARKS.md):
#   bash bench/cpu_recipes.sh ../shared/data bench/results/<date>-cpu-recipes
# Run it on a quiet machine: the two wall times are only comparable when nothing else shares the cores.
set -euo pipefail
data=${1:?usage: bash bench/cpu_recipes.sh DATA_ROOT OUT_DIR}
out=${2:?usage: bash bench/cpu_recipes.sh DATA_ROOT OUT_DIR}
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
mkdir -p "$out"
for recipe in bench/cpu-2026-11-28.yaml cpu; do
  tag=$(basename "$recipe" .yaml)
  /usr/bin/time -v -o "$out/$tag-time.txt" \
    python train.py "recipe=$recipe" "data.root=$data" "log.dir=$runs" "name=$tag" log.progress=false
  uptime > "$out/$tag-uptime.txt"  # load averages over the run: the run's own ~2 when nothing else ran
  cp "$runs/$tag/metrics.jsonl" "$out/$tag-metrics.jsonl"
  cp "$runs/$tag/summary.json" "$out/$tag-summary.json"
done
for recipe in bench/cpu-2026-11-28.yaml cpu; do
  tag=$(basename "$recipe" .yaml)
  python - "$out/$tag-summary.json" "$out/$tag-time.txt" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
wall = next(line.split(": ", 1)[1] for line in open(sys.argv[2]) if "Elapsed (wall clock)" in line)
print(f"{summary['name']}: final test top-1 {summary['final_test_top1']:.2%} (epoch {summary['epochs']}), wall {wall}")
PY
done
