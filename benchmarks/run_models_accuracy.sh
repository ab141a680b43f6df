#!/usr/bin/env bash
# A torchvision model by name on PneumoniaMNIST at 64 px, prepared by name (issue #15).
#
#   benchmarks/run_models_accuracy.sh [--root DIR] [--shards DIR] [--runs DIR] [ROUNDS]
#
# 1. The 64 px file: `fedsilo prep medmnist --name pneumoniamnist --size 64 --download`
#    fetches pneumoniamnist_64.npz from zenodo.org.  Where that is unreachable (the machine
#    these figures come from), the 28 px release ../shared/data/pneumoniamnist.npz is
#    upsampled to 64 px (PIL bilinear) into DIR/pneumoniamnist_64.npz instead, so the
#    figures are those of upsampled 28 px images, not of MedMNIST+'s 64 px images.
# 2. fedsilo prep medmnist --name pneumoniamnist --size 64 --root DIR --sites 3 \
#        --partition dirichlet:0.5 --seed 0 --out SHARDS
# 3. mpirun -n 4 fedsilo train --config jobs/configs/pneumoniamnist.yaml \
#        --set data.dir=SHARDS --set model.name=tv:resnet18 --set model.stem=imagenet \
#        --set rounds=ROUNDS --out RUNS/pneu64-tv-resnet18
#    (torchvision's ResNet-18 from scratch, BatchNorm, ImageNet stem: at 64 px the
#    small-image stem would cost 16x the compute, too much for a 2-core machine)
set -euo pipefail

cd "$(dirname "$0")/.."

ROOT=/tmp/medmnist
SHARDS=shards/pneu64
RUNS=runs
while [[ $# -gt 1 ]]; do
    case "$1" in
        --root) ROOT=$2; shift 2 ;;
        --shards) SHARDS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        *) break ;;
    esac
done
ROUNDS=${1:-5}
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
MPI_FLAGS=(--oversubscribe --bind-to none)
[[ $(id -u) == 0 ]] && MPI_FLAGS+=(--allow-run-as-root)

mkdir -p "$ROOT"
if ! .venv/bin/fedsilo prep medmnist --name pneumoniamnist --size 64 --root "$ROOT" \
        --download --sites 3 --partition dirichlet:0.5 --seed 0 --out "$SHARDS" --overwrite; then
    echo "download failed: upsampling the 28 px release to 64 px instead" >&2
    .venv/bin/python - "$ROOT" <<'PY'
import sys
import numpy as np
from PIL import Image
src = np.load("../shared/data/pneumoniamnist.npz")
out = {}
for key in src.files:
    if key.endswith("_images"):
        out[key] = np.stack([np.asarray(Image.fromarray(im).resize((64, 64), Image.BILINEAR))
                             for im in src[key]])
    else:
        out[key] = src[key]
np.savez(f"{sys.argv[1]}/pneumoniamnist_64.npz", **out)
PY
    .venv/bin/fedsilo prep medmnist --name pneumoniamnist --size 64 --root "$ROOT" \
        --sites 3 --partition dirichlet:0.5 --seed 0 --out "$SHARDS" --overwrite
fi
"$MPIRUN" "${MPI_FLAGS[@]}" -n 4 .venv/bin/fedsilo train --config jobs/configs/pneumoniamnist.yaml \
    --set "data.dir=$SHARDS" --set model.name=tv:resnet18 --set model.stem=imagenet \
    --set "rounds=$ROUNDS" --set runtime.progress=off --out "$RUNS/pneu64-tv-resnet18"
