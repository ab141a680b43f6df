#!/usr/bin/env bash
# Accuracy under sample-level DP on PneumoniaMNIST (dp_cnn, 3 participants, dirichlet:0.5):
# one run per target epsilon (per site, delta 1e-5) plus the non-private run of the same
# configuration, then a table and a PNG plot (benchmarks/plot_dp_accuracy.py).
#
#   benchmarks/run_dp_accuracy.sh [--shards DIR] [--runs DIR] [--rounds R] [--seed S]
#                                 [--png FILE] [EPS ...]
#
# EPS defaults to "1 2 4 8 inf" (inf = DP off).  Each run is
#
#   mpirun -n 4 fedsilo train --config jobs/configs/pneumoniamnist.yaml \
#       --set data.dir=DIR --set model.name=dp_cnn --set rounds=R \
#       --set train.lr=0.05 --set train.lr_decay=0.95 --set dp.enabled=true \
#       --set dp.target_epsilon=EPS --set dp.max_grad_norm=1.0 --out RUNS/dp-eps-EPS
#
# and the same without the dp settings for EPS = inf.  dp_cnn is the tempered-sigmoid CNN
# of Papernot et al. (2021): 26k parameters, so the noise (norm ∝ √d) is 4x smaller than
# the small CNN's.
#
# --seed S adds --set seed=S and names the runs RUNS/dp-eps-EPS-seedS.  The seed fixes only
# the initial weights and the data order: the Poisson masks and the DP noise come from each
# site's secret (src/fedsilo/privacy/secret.py), new in every run, so two runs with the same
# seed differ.  --png FILE (default benchmarks/results/dp-accuracy.png, "none" for no plot).
set -euo pipefail
cd "$(dirname "$0")/.."

SHARDS=/tmp/dp-shards
RUNS=runs
ROUNDS=20
SEED=
PNG=benchmarks/results/dp-accuracy.png
EPS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --shards) SHARDS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --png) PNG=$2; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) EPS+=("$1"); shift ;;
    esac
done
[[ ${#EPS[@]} -gt 0 ]] || EPS=(1 2 4 8 inf)

PYTHON=${PYTHON:-.venv/bin/python}
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
NPZ=${NPZ:-../shared/data/pneumoniamnist.npz}
MPI_FLAGS=(--oversubscribe --bind-to none)
[[ $(id -u) -eq 0 ]] && MPI_FLAGS+=(--allow-run-as-root)

if [[ ! -f $SHARDS/manifest.json ]]; then
    "$PYTHON" -m fedsilo prep medmnist --source "$NPZ" --sites 3 \
        --partition dirichlet:0.5 --seed 0 --out "$SHARDS"
fi
mkdir -p "$RUNS"
runs=()
for eps in "${EPS[@]}"; do
    out=$RUNS/dp-eps-$eps${SEED:+-seed$SEED}
    extra=(--set "data.dir=$SHARDS" --set model.name=dp_cnn --set "rounds=$ROUNDS"
           --set train.lr=0.05 --set train.lr_decay=0.95 --set runtime.progress=off)
    if [[ -n $SEED ]]; then
        extra+=(--set "seed=$SEED")
    fi
    if [[ $eps != inf ]]; then
        extra+=(--set dp.enabled=true --set "dp.target_epsilon=$eps" --set dp.max_grad_norm=1.0)
    fi
    echo "== epsilon $eps -> $out"
    "$MPIRUN" "${MPI_FLAGS[@]}" -n 4 "$PYTHON" -m fedsilo train \
        --config jobs/configs/pneumoniamnist.yaml "${extra[@]}" --out "$out" 2>&1 | tail -n 3
    runs+=("$out")
done
if [[ $PNG == none ]]; then
    "$PYTHON" benchmarks/plot_dp_accuracy.py "${runs[@]}"
else
    "$PYTHON" benchmarks/plot_dp_accuracy.py "${runs[@]}" --png "$PNG"
fi
