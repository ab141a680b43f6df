"""fedsilo.comm.local on its own: the MPI semantics the in-process tier relies on (the
round on it is checked against a real mpirun by tests/e2e/test_local_faithful.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from localjobs import local_mpirun

pytestmark = pytest.mark.local

SCRIPT = str(Path(__file__).resolve().parent / "local_comm_script.py")


def run(case: str, ranks: int = 4):
    return local_mpirun(ranks, [case], timeout=60, python_args=(SCRIPT,))


def test_abort_ends_every_rank_at_once_with_its_status():
    job = run("abort")
    assert job.returncode == 7, job.output[-2000:]
    assert job.seconds < 20, job.seconds  # the blocked ranks were ended, not waited for


def test_a_rank_ending_non_zero_is_the_job_s_status():
    job = run("exit")
    assert job.returncode == 3, job.output[-2000:]


@pytest.mark.parametrize("ranks", [4, 5])
def test_reduce_adds_in_open_mpi_s_linear_order(ranks):
    job = run("reduce", ranks)
    assert job.returncode == 0 and "reduce ok" in job.stdout, job.output[-2000:]


def test_dup_and_split_keep_their_messages_and_ranks_apart():
    job = run("contexts", 5)
    assert job.returncode == 0 and "contexts ok" in job.stdout, job.output[-2000:]
