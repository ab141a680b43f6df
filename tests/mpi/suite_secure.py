"""MPI tests of the secure transports (run under ``mpirun -n N``, N >= 2): what each rank
receives, recorded at the communicator, and what it can open with everything it holds."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
from harness import run_tests
from mpi4py import MPI

from fedsilo.comm import AGGREGATOR, World
from fedsilo.crypto import CODECS
from fedsilo.crypto.ckks import COORDINATOR_FILE, PARTICIPANT_FILE, generate_keys, load_keys
from fedsilo.crypto.params import CKKSParams
from fedsilo.messages import Contribution, RoundOutcome, RoundPlan
from fedsilo.transport import TRANSPORTS

world = World()
SIZE = 2 * 4096 + 17  # several ciphertexts, the last one partly filled

if world.is_coordinator:
    _tmp = tempfile.mkdtemp(prefix="fedsilo-secure-suite-")
    atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
    generate_keys(Path(_tmp) / "keys", CKKSParams(), num_participants=16)
    KEYS = Path(world.bcast_obj(str(Path(_tmp) / "keys")))
else:
    KEYS = Path(world.bcast_obj(None))


def update_of(rank: int) -> np.ndarray:
    """Participant ``rank``'s update (any rank can recompute it, for checking)."""
    rng = np.random.default_rng(rank)
    return (rng.standard_normal(SIZE) * 1e-3).astype(np.float32)


class RecordingComm:
    """The real communicator, with a copy of every point-to-point message this rank
    receives: what an honest-but-curious party holds after the protocol."""

    def __init__(self, comm: MPI.Comm) -> None:
        self._comm, self.received = comm, []

    def Recv(self, buf, *args, **kwargs):  # noqa: N802 - mpi4py's name
        self._comm.Recv(buf, *args, **kwargs)
        self.received.append(np.array(buf[0], copy=True).tobytes())

    def recv(self, *args, **kwargs):
        obj = self._comm.recv(*args, **kwargs)
        self.received.append(obj)
        return obj

    def Irecv(self, buf, *args, **kwargs):  # noqa: N802
        self.received.append(buf[0])  # the buffer is filled when the request completes
        return self._comm.Irecv(buf, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._comm, name)


def test_ckks_sum_reaches_the_coordinator_and_no_participant_sees_another_update() -> None:
    """The attack of the secure-aggregation issue: a participant decrypts, with the shared
    key it holds, every message that reached it.  The old binomial tree handed rank 1 the
    ciphertexts of ranks 2 and 3 alone (decryption error 1e-11); here the only thing a
    participant can ever decrypt is the total, which is the aggregate it is meant to see."""
    recording = RecordingComm(world.comm.Dup())
    team = World(recording, _dup=False)
    keys = load_keys(KEYS / (COORDINATOR_FILE if world.is_coordinator else PARTICIPANT_FILE),
                     expect="coordinator" if world.is_coordinator else "participant")
    transport = TRANSPORTS.get("ckks")(codec=CODECS.get("ckks")(keys=keys))
    ranks = tuple(range(1, world.size))
    mine = Contribution(total=np.zeros(SIZE, dtype=np.float32) if world.is_coordinator
                        else update_of(world.rank))
    if not world.is_coordinator:
        info, error = transport.prepare(mine, plan=RoundPlan(round=1, ranks=ranks),
                                        rank=world.rank)
        assert error is None and info["ciphertext_bytes"] > SIZE * 4
    outcome = RoundOutcome(round=1, ranks=ranks, contributors=ranks, in_sum=ranks,
                           rows_per_rank={}, refused=False)
    aggregate = transport.aggregate(team, mine, outcome)
    exact = np.sum([update_of(r).astype(np.float64) for r in range(1, world.size)], axis=0)
    if world.is_coordinator:
        assert aggregate is not None and aggregate.total is mine.total
        assert np.abs(aggregate.total - exact).max() < 1e-6
        assert not keys.is_private  # it added ciphertexts it cannot open
        return
    assert aggregate is None
    codec = transport.codec
    opened = 0
    for message in recording.received:
        if not isinstance(message, (bytes, bytearray)):
            continue
        try:
            # whatever arrived, decrypted with the shared key (a ciphertext of any length)
            parts = codec.from_bytes(message)
            values = codec.decrypt_into(parts, np.empty(
                len(parts) * codec.per_ciphertext, dtype=np.float64))[:SIZE]
        except Exception:  # noqa: BLE001 - not a ciphertext: nothing to open
            continue
        opened += 1
        assert values.shape == exact.shape and np.abs(values - exact).max() < 1e-6, \
            "a participant decrypted something other than the total"
        for other in range(1, world.size):
            if other != world.rank and world.size > 2:  # one participant: total = its own
                single = update_of(other).astype(np.float64)
                assert np.abs(values - single).max() > 1e-3, f"rank {other}'s update exposed"
    # the decrypting participant opens exactly one message, the total; the others none
    assert opened == (1 if world.rank == AGGREGATOR else 0), opened


def test_masked_reduce_equals_the_plain_sum_and_no_rank_sends_its_update() -> None:
    """The real MaskedReduce transport with every participant rank a site (P = ranks - 1):
    what a rank sends into the Reduce is uniformly masked, and the coordinator's dequantized
    sum equals the float64 sum within P · 2^-33 per value."""
    from fedsilo.crypto.identity import generate_identities
    from fedsilo.crypto.masks import FRAC_BITS, SiteIdentities

    num_sites = world.size - 1
    if num_sites < 2:
        return  # one site has no one to mask with (and the floor refuses such a round)
    key_dir = KEYS.parent / "identities"
    if world.is_coordinator:
        generate_identities(key_dir, num_sites=num_sites)
    world.quiet_barrier()
    identities = None if world.is_coordinator else \
        SiteIdentities(key_dir, sites=[world.rank - 1], num_sites=num_sites)
    transport = TRANSPORTS.get("masks")(frac_bits=FRAC_BITS, mask_degree=0,
                                        identities=identities)
    sites = tuple(range(num_sites))
    outcome = RoundOutcome(round=7, ranks=tuple(range(1, world.size)), contributors=sites,
                           in_sum=sites, rows_per_rank={}, refused=False, nonce=b"12345678")
    mine = Contribution(total=np.zeros(SIZE, dtype=np.float64)) if world.is_coordinator \
        else Contribution(total=update_of(world.rank), sites=(world.rank - 1,))
    aggregate = transport.aggregate(world, mine, outcome)
    if not world.is_coordinator:
        assert aggregate is None
        sent = transport.ring.view(np.int64).astype(np.float64)  # what went into the Reduce
        assert abs(np.corrcoef(sent, update_of(world.rank))[0, 1]) < 0.05
        return
    exact = np.sum([update_of(r).astype(np.float64) for r in range(1, world.size)], axis=0)
    assert np.abs(aggregate.total - exact).max() <= num_sites * 2.0 ** -33 + 1e-15


def test_reduce_ring_adds_modulo_two_to_the_64() -> None:
    """Unsigned wrap-around in MPI_Reduce is the ring Z_2^64 of masked aggregation."""
    big = np.uint64(2**64 - 5)
    buffer = np.zeros(7, dtype=np.uint64) if world.is_coordinator \
        else np.full(7, big if world.rank == 1 else np.uint64(world.rank), dtype=np.uint64)
    world.reduce_ring(buffer)
    if world.is_coordinator:
        expected = (2**64 - 5 + sum(range(2, world.size))) % 2**64
        assert np.all(buffer == np.uint64(expected)), buffer


if __name__ == "__main__":
    run_tests(dict(globals()))
