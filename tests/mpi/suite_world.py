"""MPI tests of fedsilo.comm.World (run under ``mpirun -n N``, N >= 2)."""

from __future__ import annotations

import time

import numpy as np

from fedsilo.comm import World
from fedsilo.errors import AgreedError, ShardError
from harness import run_tests

world = World()


def test_bcast_weights_copies_the_coordinator_buffer() -> None:
    buffer = np.full(1_000_003, -1.0, dtype=np.float32)
    if world.is_coordinator:
        buffer[:] = np.arange(buffer.size, dtype=np.float32)
    world.bcast_weights(buffer)
    assert np.array_equal(buffer, np.arange(buffer.size, dtype=np.float32))


def test_reduce_sum_adds_every_participant_at_the_coordinator() -> None:
    for n in (257, 1000):  # a second size re-allocates the coordinator's zero buffer
        for _ in range(2):  # the coordinator's stale buffer content must not leak in
            buffer = np.full(n, 1e6, dtype=np.float32) if world.is_coordinator \
                else np.full(n, float(world.rank), dtype=np.float32)
            world.reduce_sum(buffer)
            if world.is_coordinator:
                expected = sum(range(1, world.size))
                assert np.array_equal(buffer, np.full(n, expected, dtype=np.float32)), buffer[:4]


def test_weights_must_be_contiguous_float32() -> None:
    try:
        world.bcast_weights(np.zeros(4, dtype=np.float64))
    except TypeError as exc:
        assert "float32" in str(exc)
    else:
        raise AssertionError("a float64 buffer was accepted")


def test_agree_raises_the_same_error_on_every_rank() -> None:
    failing = world.size - 1
    error = ShardError("site-x.h5 is broken") if world.rank == failing else None
    try:
        world.agree(error, stage="loading")
    except AgreedError as exc:
        message = str(exc)
    else:
        raise AssertionError("agree did not raise")
    assert f"rank {failing}/{world.size}" in message and "site-x.h5 is broken" in message
    assert "ShardError" in message and message.startswith("loading failed")
    messages = world.allgather_obj(message)
    assert len(set(messages)) == 1, messages


def test_agree_passes_when_no_rank_fails() -> None:
    world.agree(None, stage="nothing")


def test_agree_gather_returns_every_payload() -> None:
    payloads = world.agree_gather({"rank": world.rank}, None, stage="gather")
    assert [p["rank"] for p in payloads] == list(range(world.size))


def test_agree_from_coordinator_broadcasts_its_error() -> None:
    error = ShardError("manifest missing") if world.is_coordinator else None
    try:
        world.agree_from_coordinator(None, error, stage="configuration")
    except AgreedError as exc:
        assert "manifest missing" in str(exc) and "coordinator" in str(exc)
    else:
        raise AssertionError("no error raised")


def test_quiet_barrier_waits_for_the_slowest_rank_without_spinning() -> None:
    slow = 0.3
    if world.rank == world.size - 1:
        time.sleep(slow)
    wall, cpu = time.perf_counter(), time.process_time()
    world.quiet_barrier()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if world.rank != world.size - 1:
        assert wall >= slow * 0.8, wall
        # a spinning wait would burn about as much CPU as wall time
        assert cpu < 0.5 * wall, (cpu, wall)


def test_node_local_rank_is_consistent() -> None:
    assert 0 <= world.local_rank < world.local_size <= world.size


if __name__ == "__main__":
    run_tests(dict(globals()))
