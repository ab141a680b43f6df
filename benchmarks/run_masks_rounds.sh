#!/usr/bin/env bash
# Interleaved plain / masked-secure-aggregation training runs (issue #13).
# usage: benchmarks/run_masks_rounds.sh MODEL ROUNDS PAIRS SHARDS OUTDIR [extra --set args...]
# e.g.   benchmarks/run_masks_rounds.sh small_cnn 5 3 /tmp/pneu3 /tmp/sa/small_cnn
#        benchmarks/run_masks_rounds.sh resnet18 3 2 /tmp/pneu3 /tmp/sa/resnet18 --set train.max_steps=3
# Runs plain, masks, plain, masks, ... (PAIRS pairs) with 4 ranks (3 participants), then
# summarizes with benchmarks/summarize_masks_rounds.py.
set -euo pipefail
model=$1 rounds=$2 pairs=$3 shards=$4 out=$5; shift 5
cd "$(dirname "$0")/.."
root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
mkdir -p "$out"
[ -f "$out/ident/public.json" ] || .venv/bin/python -m fedsilo keys --identity --sites 3 --out "$out/ident"
for pair in $(seq 1 "$pairs"); do
  for mode in plain masks; do
    extra=(); [ "$mode" = masks ] && extra=(--set aggregation.secure=masks --set aggregation.keys="$out/ident")
    rm -rf "$out/$mode-$pair"
    .venv/bin/mpirun "${root[@]}" --oversubscribe --bind-to none -n 4 .venv/bin/python -m fedsilo train \
      --config jobs/configs/pneumoniamnist.yaml --set data.dir="$shards" --set model.name="$model" \
      --set rounds="$rounds" "$@" "${extra[@]}" --out "$out/$mode-$pair" > "$out/$mode-$pair.log" 2>&1
    echo "$(date +%T) done $mode-$pair"
  done
done
.venv/bin/python benchmarks/summarize_masks_rounds.py "$out"
