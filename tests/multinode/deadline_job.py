"""Run under mpirun by test_bounded_waits.py: one rank is stopped (SIGSTOP) right before a
watched collective; the others must not wait in it forever."""

import json
import os
import signal
import sys

import numpy as np

from fedsilo.comm import World

what, marker = sys.argv[1], sys.argv[2]
world = World()
world.wait_s = 2.0 if world.is_coordinator else 13.0  # as watched barriers set it
victim = world.size - 1


def record(stage, silent, message, hosts=None):
    with open(marker, "w") as handle:
        json.dump({"stage": stage, "silent": silent, "message": message, "hosts": hosts}, handle)


world.on_hang = record if world.is_coordinator else None
buffer = np.ones(200_000, dtype=np.float32)
world.bcast_weights(buffer)  # a healthy one first
if world.rank == victim:
    os.kill(os.getpid(), signal.SIGSTOP)
if what == "bcast":
    world.bcast_weights(buffer)
elif what == "reduce":
    world.reduce_sum(buffer)
elif what == "ring":
    world.reduce_ring(np.ones(1000, dtype=np.uint64))
elif what == "bcast_obj":
    world.bcast_obj({"plan": 1} if world.is_coordinator else None)
elif what == "agree":
    world.agree(None, stage="checking")
print("passed", world.rank, flush=True)
# a rank past the collective goes on to its next wait, answering pings meanwhile
world.quiet_barrier(stage="the next step", timeout=world.wait_s)
print("not reached", world.rank, flush=True)
