#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything fedsilo,
# its tests and its benchmarks need: PyTorch, Open MPI from PyPI, mpi4py, h5py, ...
# Needs only Python 3 (>= 3.10) with venv.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is left to resolve together with torchvision (see docs/install.md).
.venv/bin/python -m pip install --quiet -e '.[mpi,test]'
.venv/bin/python -c 'import fedsilo, mpi4py, torch, h5py; print("fedsilo", fedsilo.__version__, "torch", torch.__version__, "ready in .venv")'
