#!/usr/bin/env bash
# CKKS aggregation through the key-less coordinator (issue #13) at P = 2, 4, 8 participants.
# usage: benchmarks/run_he_coordinator.sh MODEL REPEATS "2 4 8" OUTDIR
set -euo pipefail
model=$1 repeats=$2 sizes=$3 out=$4
cd "$(dirname "$0")/.."
root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
mkdir -p "$out"
for p in $sizes; do
  .venv/bin/mpirun "${root[@]}" --oversubscribe --bind-to none -n $((p + 1)) .venv/bin/python \
    benchmarks/bench_he.py aggregate --model "$model" --repeats "$repeats" \
    --json "$out/he-agg-$model-${p}p.json" > "$out/he-agg-$model-${p}p.log" 2>&1
  echo "$(date +%T) done $model P=$p"
done
