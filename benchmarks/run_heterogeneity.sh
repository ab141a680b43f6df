#!/usr/bin/env bash
# Heterogeneity study (issue #7): PneumoniaMNIST over 6 sites, dirichlet:0.1 and
# dirichlet:1.0, 2 sites per participant rank (3 participant ranks: mpirun -n 4), small CNN,
# 20 rounds of 1 local epoch; fedavg, fedprox, fedadam and scaffold side by side.
#
#   benchmarks/run_heterogeneity.sh [--runs DIR] [--rounds R] [ALPHA ...]
#
# Each run is
#   mpirun -n 4 fedsilo train --config jobs/configs/pneumoniamnist.yaml \
#       --set data.dir=SHARDS --set model.name=small_cnn --set rounds=R \
#       --set strategy.name=S [strategy options] --out RUNS/het-ALPHA-S
# then benchmarks/summarize_heterogeneity.py prints final acc/AUC and rounds to 0.85 acc.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=runs/heterogeneity
ROUNDS=20
ALPHAS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) ALPHAS+=("$1"); shift ;;
    esac
done
[[ ${#ALPHAS[@]} -gt 0 ]] || ALPHAS=(0.1 1.0)

PYTHON=${PYTHON:-.venv/bin/python}
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
NPZ=${NPZ:-../shared/data/pneumoniamnist.npz}
MPI_FLAGS=(--oversubscribe --bind-to none)
[[ $(id -u) -eq 0 ]] && MPI_FLAGS+=(--allow-run-as-root)

declare -A OPTIONS=(
    [fedavg]=""
    [fedprox]="--set strategy.mu=0.1"
    [fedadam]="--set strategy.server_lr=0.01"
    [scaffold]=""
)
mkdir -p "$RUNS"
runs=()
for alpha in "${ALPHAS[@]}"; do
    shards=$RUNS/shards-$alpha
    if [[ ! -f $shards/manifest.json ]]; then
        "$PYTHON" -m fedsilo prep medmnist --source "$NPZ" --sites 6 \
            --partition "dirichlet:$alpha" --seed 0 --out "$shards"
    fi
    for strategy in fedavg fedprox fedadam scaffold; do
        out=$RUNS/het-$alpha-$strategy
        rm -rf "$out"
        echo "== dirichlet:$alpha $strategy -> $out"
        # shellcheck disable=SC2086
        "$MPIRUN" "${MPI_FLAGS[@]}" -n 4 "$PYTHON" -m fedsilo train \
            --config jobs/configs/pneumoniamnist.yaml --set "data.dir=$shards" \
            --set model.name=small_cnn --set "rounds=$ROUNDS" --set runtime.progress=off \
            --set "strategy.name=$strategy" ${OPTIONS[$strategy]} --out "$out" 2>&1 | tail -n 1
        runs+=("$out")
    done
done
"$PYTHON" benchmarks/summarize_heterogeneity.py "${runs[@]}"
