#!/usr/bin/env bash
# DP that learns on small sites (issue #26): the deployed DP model (best.pt at its threshold,
# chosen on noised federated validation) against epsilon, recipe and the non-private run.
#
#   benchmarks/run_dp_small.sh --shards DIR --runs DIR --name NAME [--eps EPS] [--seed S]
#                              [-- --set KEY=VALUE ...]
#
# One run of jobs/configs/pneumoniamnist-dp.yaml into RUNS/NAME:
#
#   mpirun -n 4 python -m fedsilo train --config jobs/configs/pneumoniamnist-dp.yaml \
#       --set data.dir=DIR --set dp.target_epsilon=EPS --set seed=S [--set ...] --out RUNS/NAME
#
# EPS "inf" turns DP (and its noised validation) off: the non-private run of the same recipe.
# Then: PYTHONPATH=src python benchmarks/dp_deployed.py --test DIR/test.h5 RUNS/NAME ...
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS= RUNS= NAME= EPS=2 SEED=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --shards) SHARDS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --eps) EPS=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n $SHARDS && -n $RUNS && -n $NAME ]] || { echo "--shards, --runs and --name are required" >&2; exit 2; }
if [[ $EPS == inf ]]; then
    DP=(--set dp.enabled=false --set dp.validation.enabled=false)
else
    DP=(--set "dp.target_epsilon=$EPS")
fi
MPIRUN=${MPIRUN:-.venv/bin/mpirun --allow-run-as-root --oversubscribe --bind-to none}
$MPIRUN -n 4 .venv/bin/python -m fedsilo train --config jobs/configs/pneumoniamnist-dp.yaml \
    --set "data.dir=$SHARDS" --set "seed=$SEED" --set runtime.progress=off "${DP[@]}" "$@" \
    --out "$RUNS/$NAME"
