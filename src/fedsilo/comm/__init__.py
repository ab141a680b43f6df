"""Everything that touches MPI.  The rest of fedsilo never imports mpi4py.

Following Horovod, the user never sees MPI: a :class:`World` wraps a *duplicate* of the
communicator it is given, weights travel through uppercase buffer collectives, only small
metadata through the pickling lowercase ones, and :func:`run_guarded` turns an unexpected
exception on any rank into ``MPI_Abort`` so that no rank waits forever.
"""

from fedsilo.comm.guard import run_guarded
from fedsilo.comm.world import AGGREGATOR, COORDINATOR, World

__all__ = ["AGGREGATOR", "COORDINATOR", "World", "run_guarded"]
