#!/usr/bin/env bash
# PneumoniaMNIST with and without encrypted aggregation, side by side (benchmarks/RESULTS.md).
#
#   benchmarks/run_he.sh MODEL ROUNDS SHARDS RUNS
#
# SHARDS from: fedsilo prep medmnist --source ../shared/data/pneumoniamnist.npz \
#                  --sites 3 --partition dirichlet:0.5 --seed 0 --out SHARDS
# Writes RUNS/keys (fedsilo keys, default parameters), RUNS/MODEL-plain, RUNS/MODEL-he, and
# prints the comparison (benchmarks/compare_he.py).  Hyperparameters: jobs/configs/pneumoniamnist.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1 ROUNDS=$2 SHARDS=$3 RUNS=$4
PY=${PYTHON:-.venv/bin/python}
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
MPI=("$MPIRUN" --oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && MPI+=(--allow-run-as-root)
mkdir -p "$RUNS"
[ -f "$RUNS/keys/participant.key" ] || "$PY" -m fedsilo keys --out "$RUNS/keys"
COMMON=(--config jobs/configs/pneumoniamnist.yaml --set "data.dir=$SHARDS" --set "model.name=$MODEL"
        --set "rounds=$ROUNDS")
"${MPI[@]}" -n 4 "$PY" -m fedsilo train "${COMMON[@]}" --out "$RUNS/$MODEL-plain"
"${MPI[@]}" -n 4 "$PY" -m fedsilo train "${COMMON[@]}" --set he.enabled=true \
    --set "he.keys=$RUNS/keys" --out "$RUNS/$MODEL-he"
"$PY" benchmarks/compare_he.py "$RUNS/$MODEL-plain" "$RUNS/$MODEL-he"
