#!/usr/bin/env bash
# A federated CHASE_DB1 run (issue 28) with each rank's peak memory, then its figures:
# test Dice/IoU/AUC/HD95 at every evaluation, seconds per round, peak RSS per rank.
#
#   benchmarks/run_segmentation.sh SHARDS OUT [--set key=value ...]
#
# runs (4 ranks: the coordinator and 3 participants, one thread each)
#   mpirun -n 4 /usr/bin/time -f "rank R peak_rss_kib %M" fedsilo train \
#       --config jobs/configs/chase_db1.yaml --set data.dir=SHARDS [--set ...] --out OUT
# and prints benchmarks/summarize_segmentation.py OUT OUT.log (also written to OUT.json).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
SHARDS=$1; OUT=$2; shift 2

FEDSILO=${FEDSILO:-.venv/bin/fedsilo}
PYTHON=${PYTHON:-.venv/bin/python}
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
MPI_FLAGS=(--oversubscribe --bind-to none)
[[ $(id -u) -eq 0 ]] && MPI_FLAGS+=(--allow-run-as-root)
[[ -n "${PYTHONPATH:-}" ]] && MPI_FLAGS+=(-x PYTHONPATH)

# shellcheck disable=SC2016  # $OMPI_COMM_WORLD_RANK is each rank's, expanded by its sh
"$MPIRUN" "${MPI_FLAGS[@]}" -n 4 sh -c \
    'exec /usr/bin/time -f "rank $OMPI_COMM_WORLD_RANK peak_rss_kib %M" "$@"' sh \
    "$FEDSILO" train --config jobs/configs/chase_db1.yaml --set "data.dir=$SHARDS" "$@" \
    --out "$OUT" 2>&1 | tee "$OUT.log"
"$PYTHON" benchmarks/summarize_segmentation.py "$OUT" "$OUT.log" | tee "$OUT.json"
