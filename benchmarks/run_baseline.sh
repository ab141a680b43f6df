#!/usr/bin/env bash
# Federated vs centralized (issue #26): PneumoniaMNIST, 3 sites, dirichlet:0.5, the shipped
# config with model.name=small_cnn; the federated run, its centralized baseline, the report
# of both, and each site's personal model (--layers head and all, 1 epoch; head, 5 epochs),
# plus the baseline model's own fine-tuning for a per-site reference.
#
#   benchmarks/run_baseline.sh [--runs DIR] [--rounds R] [--seed S]
#
# The commands it runs (RUNS = DIR, default runs/baseline):
#   fedsilo prep medmnist --source ../shared/data/pneumoniamnist.npz --sites 3 \
#       --partition dirichlet:0.5 --seed 0 --out RUNS/shards
#   mpirun -n 4 fedsilo train --config jobs/configs/pneumoniamnist.yaml \
#       --set data.dir=RUNS/shards --set model.name=small_cnn --set seed=S --out RUNS/fed
#   fedsilo baseline  (the same config and --set)  --out RUNS/base
#   fedsilo report RUNS/fed RUNS/base --out RUNS/report
#   fedsilo personalize RUNS/fed --site K --layers L [--epochs E] --out RUNS/personal/...
# then benchmarks/summarize_baseline.py RUNS prints the tables of benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=runs/baseline
ROUNDS=20
SEED=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

FEDSILO=${FEDSILO:-.venv/bin/fedsilo}
PYTHON=${PYTHON:-.venv/bin/python}
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
NPZ=${NPZ:-../shared/data/pneumoniamnist.npz}
MPI_FLAGS=(--oversubscribe --bind-to none)
[[ $(id -u) -eq 0 ]] && MPI_FLAGS+=(--allow-run-as-root)

mkdir -p "$RUNS/personal"
[[ -f $RUNS/shards/manifest.json ]] || "$FEDSILO" prep medmnist --source "$NPZ" --sites 3 \
    --partition dirichlet:0.5 --seed 0 --out "$RUNS/shards"
SET=(--set "data.dir=$RUNS/shards" --set model.name=small_cnn --set "rounds=$ROUNDS"
     --set "seed=$SEED")
[[ -f $RUNS/fed/summary.json ]] || "$MPIRUN" "${MPI_FLAGS[@]}" -n 4 "$PYTHON" -m fedsilo \
    train --config jobs/configs/pneumoniamnist.yaml "${SET[@]}" --out "$RUNS/fed"
[[ -f $RUNS/base/summary.json ]] || "$FEDSILO" baseline \
    --config jobs/configs/pneumoniamnist.yaml "${SET[@]}" --out "$RUNS/base"
"$FEDSILO" report "$RUNS/fed" "$RUNS/base" --out "$RUNS/report"
for site in 0 1 2; do
    for variant in "head 1" "all 1" "head 5"; do
        read -r layers epochs <<<"$variant"
        out=$RUNS/personal/fed-site$site-$layers-e$epochs.pt
        [[ -f $out ]] || "$FEDSILO" personalize "$RUNS/fed" --site "$site" --layers "$layers" \
            --epochs "$epochs" --out "$out"
    done
    out=$RUNS/personal/base-site$site-head-e1.pt
    [[ -f $out ]] || "$FEDSILO" personalize "$RUNS/base" --site "$site" --out "$out"
done
"$PYTHON" benchmarks/summarize_baseline.py "$RUNS"
