"""A tiny test runner for scripts launched under ``mpirun -n N``.

Every rank runs every test function; after each one the ranks agree on the outcome
(allgather) so a failure on one rank is reported by all and no rank is left behind in a
collective.  The script exits 0 only if every test passed on every rank, and rank 0 prints
the plain closing line ``N passed, M failed``.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable

from fedsilo.comm.guard import world_comm


def run_tests(tests: dict[str, Callable[[], None]]) -> None:
    comm = world_comm()  # MPI's under mpirun, fedsilo.comm.local's in the in-process tier
    rank, size = comm.Get_rank(), comm.Get_size()
    passed = failed = 0
    for name, test in tests.items():
        if not name.startswith("test_"):
            continue
        try:
            test()
            error = None
        except Exception:  # noqa: BLE001 - reported, then agreed across ranks
            error = traceback.format_exc()
        errors = comm.allgather(error)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            failed += 1
            if rank == 0:
                for r, e in bad:
                    print(f"FAILED {name} on rank {r}/{size}:\n{e}", flush=True)
        else:
            passed += 1
            if rank == 0:
                print(f"ok {name} [{size} ranks]", flush=True)
    if rank == 0:
        print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)
