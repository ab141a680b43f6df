"""Launch the MPI test suites (``suite_*.py``) as real jobs at 4 ranks, and on in-process
ranks (fedsilo.comm.local) at 2 and 4 ranks, the secure transports at 5 and 9 too."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import mpirun
from localjobs import local_mpirun

HERE = Path(__file__).resolve().parent
SUITES = sorted(p.name for p in HERE.glob("suite_*.py"))


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("num_ranks", [4])
@pytest.mark.parametrize("suite", SUITES)
def test_suite(suite: str, num_ranks: int) -> None:
    job = mpirun(num_ranks, [suite], timeout=180, cwd=HERE, python_args=())
    assert job.returncode == 0, job.output[-5000:]
    assert "0 failed" in job.stdout and f"[{num_ranks} ranks]" in job.stdout, job.output[-3000:]


@pytest.mark.local
@pytest.mark.slow
@pytest.mark.parametrize("num_ranks", [5, 9])
def test_secure_transport_suite_with_more_participants(num_ranks: int) -> None:
    """The no-exposure test with 4 and 8 participants (3 run above, with 4 ranks), on
    in-process ranks."""
    job = local_mpirun(num_ranks, ["suite_secure.py"], timeout=240, cwd=HERE, python_args=())
    assert job.returncode == 0, job.output[-5000:]
    assert "0 failed" in job.stdout and f"[{num_ranks} ranks]" in job.stdout, job.output[-3000:]


@pytest.mark.local
@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("suite", SUITES)
def test_suite_on_in_process_ranks(suite: str, num_ranks: int) -> None:
    """The same suites on forked ranks over fedsilo.comm.local.LocalComm (the in-process
    tier's communicator): World's collectives, masks and CKKS behave as under mpirun."""
    job = local_mpirun(num_ranks, [suite], timeout=180, cwd=HERE, python_args=())
    assert job.returncode == 0, job.output[-5000:]
    assert "0 failed" in job.stdout and f"[{num_ranks} ranks]" in job.stdout, job.output[-3000:]
