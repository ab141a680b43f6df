#!/usr/bin/env bash
# Train on a workstation with mpirun: P+1 ranks for the P shards of CONFIG's data.dir.
#
# usage: jobs/local/train.sh CONFIG RUN_DIR [--set key=value ...]
# environment: MPIRUN (default: mpirun beside PYTHON, else on PATH), PYTHON (default python3)
#              MPIRUN_ARGS (extra launcher options)
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
config=$1 run_dir=$2
shift 2
python=${PYTHON:-python3}
# the rank count comes from the shard set the config points at (overrides of data.dir too)
ranks=$("$python" - "$config" "$@" <<'PY'
import sys
from fedsilo.config import load_config
from fedsilo.shards import load_manifest
args = sys.argv[2:]
sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
print(load_manifest(load_config(sys.argv[1], overrides=sets).data.dir).num_sites + 1)
PY
)
mpirun=${MPIRUN:-$(dirname "$(command -v "$python")")/mpirun}
[ -x "$mpirun" ] || mpirun=mpirun
flags=()
if "$mpirun" --version 2>&1 | grep -q "Open MPI"; then
  flags=(--oversubscribe --bind-to none)
  [ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
  # one machine: skip the libfabric transport's ~1 s probe at every start (docs/hpc.md)
  export OMPI_MCA_btl=${OMPI_MCA_btl:-^ofi}
fi
# shellcheck disable=SC2086
exec "$mpirun" -n "$ranks" "${flags[@]}" ${MPIRUN_ARGS:-} "$python" -m fedsilo train \
  --config "$config" --out "$run_dir" --auto-resume "$@"
