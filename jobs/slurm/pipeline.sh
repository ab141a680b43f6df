#!/usr/bin/env bash
# Submit a whole fedsilo pipeline: shard preparation (a job array, one task per file), then
# training (P+1 tasks) once every preparation task has succeeded (afterok).  Prints the ids.
#
# usage: jobs/slurm/pipeline.sh DATASET CONFIG [RUN_DIR]
#   DATASET  a MedMNIST 2-D .npz file, or "synthetic"
#   CONFIG   a training config; the shards are written to its data.dir
#   RUN_DIR  where the run goes (default runs/<config name>)
# environment (all optional):
#   SITES=3  PARTITION=iid  SEED=0                  how the data is split (PARTICIPANTS:
#                                                   the old name of SITES)
#   PREP_SBATCH_ARGS, TRAIN_SBATCH_ARGS             extra sbatch options (e.g. --partition=gpu)
#   TRAIN_ARGS                                      extra `fedsilo train` options (--set ...)
#   FEDSILO (default fedsilo), PYTHON (default python3: reads data.dir from CONFIG)
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
dataset=$1 config=$2
run_dir=${3:-runs/$(basename "${config%.*}")}
here=$(cd "$(dirname "$0")" && pwd)
sites=${SITES:-${PARTICIPANTS:-3}}
shards=$(${PYTHON:-python3} -c 'import sys, yaml; print(((yaml.safe_load(open(sys.argv[1])) or {}).get("data") or {}).get("dir", "shards"))' "$config")

if [ "$dataset" = synthetic ]; then
  source_args=(synthetic)
else
  source_args=(medmnist --source "$dataset")
fi
# shellcheck disable=SC2086  # the *_ARGS variables are lists of options
prep=$(sbatch --parsable --array="0-${sites}" ${PREP_SBATCH_ARGS:-} \
  "$here/prep.sbatch" "${source_args[@]}" --sites "$sites" \
  --partition "${PARTITION:-iid}" --seed "${SEED:-0}" --out "$shards" --overwrite)
# shellcheck disable=SC2086
train=$(sbatch --parsable --dependency="afterok:${prep}" --kill-on-invalid-dep=yes \
  --ntasks=$((sites + 1)) ${TRAIN_SBATCH_ARGS:-} \
  "$here/train.sbatch" "$config" "$run_dir" ${TRAIN_ARGS:-})
echo "prep job ${prep} (array 0-${sites}: ${sites} site shards + test.h5 -> ${shards})"
echo "train job ${train} (afterok:${prep}, $((sites + 1)) tasks -> ${run_dir})"
