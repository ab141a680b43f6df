"""Run on in-process ranks by test_local_comm.py: ``local_comm_script.py CASE``."""

import sys
import time

import numpy as np
from mpi4py import MPI

from fedsilo.comm.guard import world_comm

comm = world_comm()
rank, size = comm.Get_rank(), comm.Get_size()
case = sys.argv[1]

if case == "abort":
    if rank == 1:
        time.sleep(0.5)
        comm.Abort(7)
    comm.recv(source=MPI.ANY_SOURCE, tag=5)  # never sent: only the abort ends this rank
elif case == "exit":
    sys.exit(3 if rank == 2 else 0)
elif case == "reduce":
    # terms whose sum depends on the order of the additions
    x = np.array([0.0, 1e8, -1e8, 1.0][rank % 4] * np.ones(8), dtype=np.float32)
    out = np.empty_like(x) if rank == 0 else None
    comm.Reduce([x, MPI.FLOAT], [out, MPI.FLOAT] if rank == 0 else None, op=MPI.SUM, root=0)
    if rank == 0:
        parts = [np.float32([0.0, 1e8, -1e8, 1.0][r % 4]) for r in range(size)]
        linear = parts[-1]
        for part in reversed(parts[:-1]):
            linear = np.float32(part + linear)
        forward = np.float32(0)
        for part in parts:
            forward = np.float32(forward + part)
        assert linear != forward  # the case tells the orders apart
        assert np.all(out == linear), (out, linear)
        print("reduce ok", flush=True)
elif case == "contexts":
    dup = comm.Dup()
    odd = comm.Split(rank % 2, key=-rank)  # reversed order within each half
    if rank == 0:
        dup.send("on dup", dest=1, tag=1)
        comm.send("on world", dest=1, tag=1)
    if rank == 1:
        assert comm.recv(source=0, tag=1) == "on world"
        assert dup.recv(source=0, tag=1) == "on dup"
    members = odd.allgather(rank)
    assert members == sorted([r for r in range(size) if r % 2 == rank % 2], reverse=True)
    group = odd.Get_group().Translate_ranks(list(range(odd.Get_size())), comm.Get_group())
    assert group == members
    none = comm.Split(MPI.UNDEFINED if rank else 0, key=rank)
    assert (none == MPI.COMM_NULL) == (rank != 0)
    assert comm.allgather(rank) == list(range(size))
    if rank == 0:
        print("contexts ok", flush=True)
sys.exit(0)
