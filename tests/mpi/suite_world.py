"""MPI tests of fedsilo.comm.World (run under ``mpirun -n N``, N >= 2)."""

from __future__ import annotations

import time

import numpy as np
from harness import run_tests

from fedsilo.comm import World
from fedsilo.errors import AgreedError, ShardError

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


def test_reduce_sum_in_float64_is_exact_for_any_grouping() -> None:
    # float32 values whose float32 sum depends on the order: float64 keeps every bit
    values = np.array([1.0, 2.0 ** -24, 2.0 ** -24, -1.0], dtype=np.float32)
    buffer = np.zeros(3, dtype=np.float64) if world.is_coordinator \
        else np.full(3, values[(world.rank - 1) % 4], dtype=np.float64)
    world.reduce_sum(buffer)
    if world.is_coordinator:
        expected = sum(float(values[(r - 1) % 4]) for r in range(1, world.size))
        assert np.array_equal(buffer, np.full(3, expected)), buffer


def test_subset_holds_the_coordinator_and_the_named_ranks_only() -> None:
    assert world.subset(range(1, world.size)) is world  # everyone: the world itself
    chosen = [world.size - 1]
    team = world.subset(chosen)
    assert (team is not None) == (world.rank in (0, *chosen))
    assert world.subset(chosen) is team  # reused, no new communicator
    if team is not None:
        assert team.size == 2 and team.rank == (0 if world.is_coordinator else 1)
        buffer = np.full(5, float(world.rank), dtype=np.float32)
        team.reduce_sum(buffer)
        if world.is_coordinator:
            assert np.array_equal(buffer, np.full(5, float(world.size - 1), dtype=np.float32))
    # more distinct sets than are kept: every rank evicts the same, and all still work
    for extra in range(World.SUBSETS_KEPT + 2):
        ranks = [1 + (extra % (world.size - 1))]
        team = world.subset(ranks)
        marker = np.array([float(extra)], dtype=np.float32)
        if team is not None:
            team.bcast_weights(marker)
            assert marker[0] == extra
    world.quiet_barrier()


def test_gather_rows_delivers_every_row_in_rank_order() -> None:
    counts = [0] + [(r % 3) for r in range(1, world.size)]  # some ranks send no row
    width = 7
    rows = None if world.is_coordinator or not counts[world.rank] else np.array(
        [[world.rank * 10 + i] * width for i in range(counts[world.rank])], dtype=np.float32
    ).reshape(counts[world.rank], width)  # a rank with nothing to send may pass None
    out = world.gather_rows(rows, counts, width)
    if world.is_coordinator:
        expected = [[r * 10 + i] * width for r in range(1, world.size) for i in range(counts[r])]
        assert out.shape == (sum(counts), width)
        assert np.array_equal(out, np.array(expected, dtype=np.float32).reshape(-1, width))
    else:
        assert out is None


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


def test_agree_report_reaches_the_coordinator_only() -> None:
    """A participant's round report is for the coordinator: no other participant receives
    any part of it (least metadata), while errors still reach every rank."""
    secret_value = f"report of rank {world.rank}"
    got, summary = world.agree_report({"rank": world.rank, "private": secret_value}, None,
                                      stage="round 1", summarize=lambda p: len(p))
    assert summary == world.size  # what the coordinator made of the reports reaches all
    if world.is_coordinator:
        assert [p["rank"] for p in got] == list(range(world.size))
        assert got[-1]["private"] == f"report of rank {world.size - 1}"
    else:
        assert got is None
    failing = world.size - 1
    error = ShardError("site-x.h5 went away") if world.rank == failing else None
    try:
        world.agree_report({"private": secret_value}, error, stage="round 2")
    except AgreedError as exc:
        message = str(exc)
    else:
        raise AssertionError("agree_report did not raise")
    assert message.startswith("round 2 failed") and "site-x.h5 went away" in message
    assert "report of rank" not in message  # the failure travels, the payloads do not
    assert len(set(world.allgather_obj(message))) == 1


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
