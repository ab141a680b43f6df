#!/usr/bin/env bash
# Round time of plain, masks and CKKS training, with the participants' checks of a deviating
# coordinator (this tree) against the same modes before them (an older checkout), interleaved.
# usage: benchmarks/run_secure_checks.sh MODEL ROUNDS PAIRS SHARDS OUTDIR OLD_SRC [--set ...]
# e.g.   git worktree add /tmp/fedsilo-old f048d2a
#        benchmarks/run_secure_checks.sh small_cnn 5 2 /tmp/pneu3 /tmp/sc/small_cnn /tmp/fedsilo-old/src
# OLD_SRC is put first on PYTHONPATH for the "-old" runs; both use this tree's .venv.
# Summary: benchmarks/summarize_secure_checks.py OUTDIR
set -euo pipefail
model=$1 rounds=$2 pairs=$3 shards=$4 out=$5 old=$6; shift 6
cd "$(dirname "$0")/.."
root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
mkdir -p "$out"
[ -f "$out/ident/public.json" ] || .venv/bin/python -m fedsilo keys --identity --sites 3 --out "$out/ident" >/dev/null
# CKKS keys: this tree's `fedsilo keys` also writes the identity keys CKKS masks with
[ -f "$out/ckks/participant.key" ] || .venv/bin/python -m fedsilo keys --sites 3 --out "$out/ckks" >/dev/null
for pair in $(seq 1 "$pairs"); do
  for mode in plain masks masks-old ckks ckks-old; do
    extra=()
    case $mode in
      masks*) extra=(--set aggregation.secure=masks --set aggregation.keys="$out/ident") ;;
      ckks*) extra=(--set aggregation.secure=ckks --set he.keys="$out/ckks") ;;
    esac
    path=(); [[ $mode == *-old ]] && path=(env PYTHONPATH="$old")
    rm -rf "$out/$mode-$pair"
    "${path[@]}" .venv/bin/mpirun "${root[@]}" --oversubscribe --bind-to none -n 4 \
      .venv/bin/python -m fedsilo train --config jobs/configs/pneumoniamnist.yaml \
      --set data.dir="$shards" --set model.name="$model" --set rounds="$rounds" \
      --set runtime.progress=off "$@" "${extra[@]}" --out "$out/$mode-$pair" \
      > "$out/$mode-$pair.log" 2>&1
    echo "$(date +%T) done $mode-$pair"
  done
done
.venv/bin/python benchmarks/summarize_secure_checks.py "$out"
