"""Run the ``fedsilo`` command with a fault planted on one rank (fault-injection tests only).

FEDSILO_TEST_FAULT=KIND:RANK:CALL makes the CALL-th local training on RANK fail:
  raise  - raise an unexpected RuntimeError (a bug)
  exit   - the process dies at once with status 3 (a crash: OOM kill, segfault)
"""

import os
import sys

from mpi4py import MPI

kind, rank, call = os.environ["FEDSILO_TEST_FAULT"].split(":")
if MPI.COMM_WORLD.Get_rank() == int(rank):
    import fedsilo.roles as roles

    original, calls = roles.train_local, [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(call):
            if kind == "exit":
                os._exit(3)
            raise RuntimeError("injected failure in local training")
        return original(*args, **kwargs)

    roles.train_local = faulty

from fedsilo.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
