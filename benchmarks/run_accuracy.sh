#!/usr/bin/env bash
# The PneumoniaMNIST accuracy benchmark, end to end (see benchmarks/RESULTS.md).
#
#   benchmarks/run_accuracy.sh [--shards DIR] [--runs DIR] [--timeout SECONDS] [MODEL ...]
#
# MODEL is resnet18 and/or small_cnn (default: both, small_cnn first).  From the repo root
# (the script cds there itself), with ../shared/data/pneumoniamnist.npz beside the repo:
#
#   1. fedsilo prep medmnist --source ../shared/data/pneumoniamnist.npz --sites 3 \
#          --partition dirichlet:0.5 --seed 0 --out shards/pneu
#      (skipped when DIR/manifest.json exists; the shard set is verified either way, which
#      prints the per-site class histograms)
#   2. mpirun -n 4 fedsilo train --config jobs/configs/pneumoniamnist.yaml \
#          --set data.dir=shards/pneu --out runs/pneu-resnet18
#      mpirun -n 4 fedsilo train --config jobs/configs/pneumoniamnist.yaml \
#          --set data.dir=shards/pneu --set model.name=small_cnn --set train.lr=0.01 \
#          --out runs/pneu-small_cnn
#   3. python benchmarks/overhead.py on the runs just made.
#
# Every rank count, seed and hyperparameter comes from jobs/configs/pneumoniamnist.yaml
# (3 participants, 20 rounds, 1 local epoch, SGD lr 0.01 momentum 0.9, batch 64) plus the
# --set lines above.  Open MPI gets --oversubscribe --bind-to none (4 ranks may share fewer
# cores; fedsilo gives each rank its share of threads) and --allow-run-as-root as root.
# A run directory that already holds a run is refused by fedsilo: choose another --runs.
set -euo pipefail

cd "$(dirname "$0")/.."

SHARDS=shards/pneu
RUNS=runs
TIMEOUT=""
MODELS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --shards) SHARDS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        resnet18|small_cnn) MODELS+=("$1"); shift ;;
        *) echo "run_accuracy.sh: unknown argument '$1' (models: resnet18, small_cnn)" >&2; exit 2 ;;
    esac
done
[[ ${#MODELS[@]} -gt 0 ]] || MODELS=(small_cnn resnet18)

PYTHON=${PYTHON:-.venv/bin/python}
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
NPZ=${NPZ:-../shared/data/pneumoniamnist.npz}
MPI_FLAGS=(--oversubscribe --bind-to none)
[[ $(id -u) -eq 0 ]] && MPI_FLAGS+=(--allow-run-as-root)

echo "== shards: $SHARDS"
if [[ ! -f $SHARDS/manifest.json ]]; then
    "$PYTHON" -m fedsilo prep medmnist --source "$NPZ" --sites 3 \
        --partition dirichlet:0.5 --seed 0 --out "$SHARDS"
fi
"$PYTHON" -m fedsilo prep verify "$SHARDS"

mkdir -p "$RUNS"
made=()
for model in "${MODELS[@]}"; do
    out=$RUNS/pneu-$model
    extra=(--set "data.dir=$SHARDS")
    if [[ $model == small_cnn ]]; then
        extra+=(--set model.name=small_cnn --set train.lr=0.01)
        limit=${TIMEOUT:-1800}
    else
        limit=${TIMEOUT:-14400}
    fi
    echo "== $model -> $out (log: $out.log, time limit ${limit}s)"
    start=$(date +%s)
    timeout "$limit" "$MPIRUN" "${MPI_FLAGS[@]}" -n 4 "$PYTHON" -m fedsilo train \
        --config jobs/configs/pneumoniamnist.yaml "${extra[@]}" --out "$out" 2>&1 | tee "$out.log"
    echo "== $model: $(( $(date +%s) - start )) s wall clock"
    made+=("$out")
done

echo "== overhead"
"$PYTHON" benchmarks/overhead.py "${made[@]}"
