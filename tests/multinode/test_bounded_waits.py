"""Every blocking collective is bounded by the deadline thread (one machine, no namespaces
needed): a rank that stops inside one ends the job with EXIT_HUNG, the coordinator naming
it as unreachable, within the bound plus the pings' grace (issue #29)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import mpirun

from fedsilo.stopping import EXIT_HUNG

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("what", ["bcast", "reduce", "ring", "bcast_obj", "agree"])
def test_a_rank_stopped_in_a_collective_ends_the_job(what, tmp_path):
    marker = tmp_path / "hung.json"
    job = mpirun(3, [str(HERE / "deadline_job.py"), what, str(marker)], timeout=60,
                 python_args=())
    assert job.returncode == EXIT_HUNG, job.output[-3000:]
    assert "not reached 0" not in job.stdout
    record = json.loads(marker.read_text())
    assert record["silent"] == [2], record
    # in the collective ("unreachable"), or, where the coordinator's part of it completed
    # at once (a small eager bcast), at its next watched barrier ("silent")
    assert "unreachable: rank 2 on" in record["message"] \
        or "silent: rank 2 (participant 2)" in record["message"], record
    assert set(record["hosts"]) == {"2"}, record
    # start-up (~2 s) + the 2 s bound + 3 s of grace for the pings, with room for a
    # loaded machine; without the deadline it would never end
    assert job.seconds < 25, job.seconds
