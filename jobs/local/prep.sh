#!/usr/bin/env bash
# Preprocess a dataset into a shard set on a workstation, one process per file in parallel
# (the same files as `fedsilo prep` alone, which is serial).
#
# usage: jobs/local/prep.sh SOURCE --sites P [fedsilo prep options...] --out DIR
#   e.g. jobs/local/prep.sh medmnist --source ../shared/data/pneumoniamnist.npz \
#            --sites 3 --partition dirichlet:0.5 --seed 0 --out shards/pneu
# environment: FEDSILO (default: fedsilo on PATH), JOBS (parallel processes, default: cores)
set -euo pipefail

sites=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  # --participants: the old spelling of --sites
  case "${args[$i]}" in --sites | --participants) sites=${args[$((i + 1))]:-} ;; esac
done
if [ -z "$sites" ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
jobs=${JOBS:-$(nproc)}
pids=() status=0
for task in $(seq 0 "$sites"); do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
  if [ "$task" -eq "$sites" ]; then only=test; else only=site:$task; fi
  ${FEDSILO:-fedsilo} prep "$@" --only "$only" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
