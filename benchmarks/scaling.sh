#!/usr/bin/env bash
# Scaling of the round: time and non-training share for P = 2, 4, 8 participants
# (P+1 ranks, oversubscribed on small machines) and both models.  Local work is capped at
# a few steps (train.max_steps) so the figure shows how transport and coordination grow with
# P and model size, not how training time shrinks with smaller shards.
#
# usage: benchmarks/scaling.sh [OUT_DIR]      (default runs/scaling; prints a table at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/scaling}
python=${PYTHON:-.venv/bin/python}
mpirun=${MPIRUN:-.venv/bin/mpirun}
flags=(--oversubscribe --bind-to none)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
mkdir -p "$out"
for p in 2 4 8; do
  [ -f "$out/shards-$p/manifest.json" ] || "$python" -m fedsilo prep synthetic --samples 4000 \
    --classes 2 --sites "$p" --partition iid --seed 0 --out "$out/shards-$p" >/dev/null
  for model in small_cnn resnet18; do
    rm -rf "$out/run-$model-$p"
    timeout 1800 "$mpirun" -n $((p + 1)) "${flags[@]}" "$python" -m fedsilo train \
      --set data.dir="$out/shards-$p" --set model.name=$model --set rounds=4 \
      --set train.max_steps=3 --set train.batch_size=32 --set eval.every=100 \
      --set runtime.threads=1 --out "$out/run-$model-$p" 2>"$out/run-$model-$p.log"
  done
done
"$python" - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'model':<10}{'P':>3}{'params':>11}{'round s':>9}{'bcast ms':>10}{'reduce ms':>11}"
      f"{'coord ms':>10}{'comm %':>8}{'not-train %':>13}")
for model in ("small_cnn", "resnet18"):
    for p in (2, 4, 8):
        rows = [json.loads(l) for l in (out / f"run-{model}-{p}" / "metrics.jsonl").read_text().splitlines()][1:]
        med = lambda key: statistics.median(r["seconds"].get(key, 0.0) for r in rows)
        comm = statistics.median((r["seconds"]["broadcast"] + r["seconds"]["aggregate"]
                                  + r["seconds"]["coordination"]) / r["seconds"]["round"] for r in rows)
        other = statistics.median((r["seconds"]["round"] - r["seconds"]["local_compute_max"]
                                   - r["seconds"].get("evaluate", 0.0)) / r["seconds"]["round"] for r in rows)
        params = json.loads((out / f"run-{model}-{p}" / "summary.json").read_text())["num_parameters"]
        print(f"{model:<10}{p:>3}{params:>11,}{med('round'):>9.2f}{1e3 * med('broadcast'):>10.1f}"
              f"{1e3 * med('aggregate'):>11.1f}{1e3 * med('coordination'):>10.1f}{100 * comm:>8.2f}{100 * other:>13.2f}")
print("(medians over rounds 2-4; round 1 includes warm-up)")
PY
