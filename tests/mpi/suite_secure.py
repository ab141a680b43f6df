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

import fedsilo.transport as transport_module
from fedsilo.comm import AGGREGATOR, World
from fedsilo.crypto import CODECS, session
from fedsilo.crypto.ckks import COORDINATOR_FILE, PARTICIPANT_FILE, generate_keys, load_keys
from fedsilo.crypto.identity import generate_identities
from fedsilo.crypto.masks import SiteIdentities
from fedsilo.crypto.params import CKKSParams
from fedsilo.messages import Contribution, RoundOutcome, RoundPlan
from fedsilo.transport import TRANSPORTS

world = World()
SIZE = 2 * 4096 + 17  # several ciphertexts, the last one partly filled

if world.is_coordinator:
    _tmp = tempfile.mkdtemp(prefix="fedsilo-secure-suite-")
    atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
    generate_keys(Path(_tmp) / "keys", CKKSParams(), num_participants=16)
    if world.size > 2:
        generate_identities(Path(_tmp) / "keys", num_sites=world.size - 1)
    KEYS = Path(world.bcast_obj(str(Path(_tmp) / "keys")))
else:
    KEYS = Path(world.bcast_obj(None))
PEERS = world.split_participants()


def session_seed() -> bytes | None:
    """The participants' joint seed, drawn by the real commit-then-reveal (None on rank 0)."""
    if world.is_coordinator:
        return None
    own = session.new_contribution()
    index = PEERS.Get_rank()
    commitments = PEERS.allgather(session.commitment(own, index=index))
    return session.joint_seed(commitments, PEERS.allgather(own), own_index=index, own=own)


def ckks_transport(keys) -> object:
    identities = None if world.is_coordinator or world.size < 3 else \
        SiteIdentities(KEYS, sites=[world.rank - 1], num_sites=world.size - 1)
    transport = TRANSPORTS.get("ckks")(codec=CODECS.get("ckks")(keys=keys),
                                       identities=identities)
    transport.start_session(session_seed() or b"")
    return transport


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
    transport = ckks_transport(keys)
    ranks = tuple(range(1, world.size))
    sites = tuple(r - 1 for r in ranks)
    mine = Contribution(total=np.zeros(SIZE, dtype=np.float32) if world.is_coordinator
                        else update_of(world.rank), sites=(world.rank - 1,))
    if not world.is_coordinator:
        info, error = transport.prepare(mine, plan=RoundPlan(round=1, ranks=ranks,
                                                             participants=sites),
                                        rank=world.rank)
        assert error is None and info["ciphertext_bytes"] > SIZE * 4
    outcome = RoundOutcome(round=1, ranks=ranks, contributors=ranks, in_sum=ranks,
                           rows_per_rank={}, refused=False)
    aggregate = transport.aggregate(team, mine, outcome)
    exact = np.sum([update_of(r).astype(np.float64) for r in range(1, world.size)], axis=0)
    if world.is_coordinator:
        assert aggregate is not None and aggregate.total is mine.total
        assert np.abs(aggregate.total - exact).max() < (world.size - 1) * 2.0 ** -30
        assert not keys.is_private  # it added ciphertexts it cannot open
        return
    assert aggregate is None
    opened = 0
    for message in recording.received:
        if not isinstance(message, (bytes, bytearray)):
            continue
        try:
            # whatever arrived, decrypted with the shared key (a ciphertext of any length)
            values = transport.open_sum(message, world.size - 1, out=np.empty(SIZE))
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


def test_ckks_decryptor_is_no_oracle_for_a_deviating_coordinator() -> None:
    """The deviating coordinator of the privacy issue: it hands the decrypting participant
    one site's ciphertext instead of the total, and gets back whatever that decrypts to.
    Without the masks (the control, ``masked=False``: what fedsilo did before) that is the
    site's update, exactly; with them it is uniform in the ring, uncorrelated with it.  The
    honest total, handed over next, still opens to the sum."""
    if world.size < 3:
        return  # one participant: its 'sum' is its own update (refused by the floor)
    from fedsilo.comm.world import _TAG_TREE
    from fedsilo.crypto import ring

    target = 2
    opened = {}
    for masked in (False, True):
        keys = load_keys(KEYS / (COORDINATOR_FILE if world.is_coordinator else PARTICIPANT_FILE),
                         expect="coordinator" if world.is_coordinator else "participant")
        transport = ckks_transport(keys)
        ranks = tuple(range(1, world.size))
        if not world.is_coordinator:
            plan = RoundPlan(round=1, ranks=ranks, participants=tuple(r - 1 for r in ranks))
            original = transport_module.add_site_masks
            if not masked:
                transport_module.add_site_masks = lambda *a, **k: None
            try:
                _, error = transport.prepare(
                    Contribution(total=update_of(world.rank), sites=(world.rank - 1,)),
                    plan=plan, rank=world.rank)
            finally:
                transport_module.add_site_masks = original
            assert error is None
            world.comm.Send([np.frombuffer(transport.payload, dtype=np.uint8), MPI.BYTE],
                            dest=0, tag=_TAG_TREE)
            for _ in range(2):  # the deviating coordinator's pick, then the honest total
                data = world.receive_total()
                out = np.zeros(SIZE, dtype=np.float32)
                if data is not None:
                    transport.open_sum(data, len(ranks), out=out)
                world.relay_to_coordinator(out, None)
            continue
        blobs = {}
        for _ in ranks:  # the coordinator keeps each ciphertext apart, as it may
            status = MPI.Status()
            world.comm.Probe(source=MPI.ANY_SOURCE, tag=_TAG_TREE, status=status)
            buffer = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
            world.comm.Recv([buffer, MPI.BYTE], source=status.Get_source(), tag=_TAG_TREE)
            blobs[status.Get_source()] = buffer.tobytes()
        world.send_to_aggregator(blobs[target])
        single = np.zeros(SIZE, dtype=np.float32)
        world.relay_to_coordinator(single, None)
        codec = transport.codec
        total = codec.from_bytes(blobs[1])
        for rank in ranks[1:]:
            total = codec.add_into(total, codec.from_bytes(blobs[rank]))
        world.send_to_aggregator(codec.to_bytes(total))
        whole = np.zeros(SIZE, dtype=np.float32)
        world.relay_to_coordinator(whole, None)
        opened[masked] = (single, whole)
    if world.is_coordinator:
        exact = np.sum([update_of(r).astype(np.float64) for r in range(1, world.size)], axis=0)
        secret = update_of(target).astype(np.float64)
        bound = ring.ring_encoding(CKKSParams(), num_terms=world.size - 1).max_error(
            world.size - 1) + 1e-7  # float32 of the relayed sum
        unmasked_single, unmasked_whole = opened[False]
        assert np.abs(unmasked_single - secret).max() < 1e-6, "the control: the oracle works"
        single, whole = opened[True]
        assert abs(np.corrcoef(single, secret)[0, 1]) < 0.05, "one site's update came out"
        assert np.abs(single - secret).max() > 1.0
        assert np.abs(whole - exact).max() < bound and np.abs(unmasked_whole - exact).max() < bound


def test_masked_reduce_equals_the_plain_sum_and_no_rank_sends_its_update() -> None:
    """The real MaskedReduce transport with every participant rank a site (P = ranks - 1):
    what a rank sends into the Reduce is uniformly masked, and the coordinator's dequantized
    sum equals the float64 sum within P · 2^-33 per value."""
    from fedsilo.crypto.masks import FRAC_BITS

    num_sites = world.size - 1
    if num_sites < 2:
        return  # one site has no one to mask with (and the floor refuses such a round)
    identities = None if world.is_coordinator else \
        SiteIdentities(KEYS, sites=[world.rank - 1], num_sites=num_sites)
    transport = TRANSPORTS.get("masks")(frac_bits=FRAC_BITS, mask_degree=0,
                                        identities=identities)
    transport.start_session(session_seed() or b"")
    sites = tuple(range(num_sites))
    outcome = RoundOutcome(round=7, ranks=tuple(range(1, world.size)), contributors=sites,
                           in_sum=sites, rows_per_rank={}, refused=False)
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


def test_fixed_point_reduce_is_the_exact_integer_sum_and_equals_the_masked_one() -> None:
    """runtime.reduce_dtype: fixed -- the plain sum in 64-bit fixed point through the real
    Reduce: the coordinator gets exactly the integer sum of every rank's quantized update
    (computed here in Python integers, in reverse order), so no order or grouping of MPI's
    algorithm can change a bit; and the masked transport, whose masks cancel in the same
    ring, delivers the very same bits."""
    from fedsilo.crypto.masks import FRAC_BITS, dequantize, quantize

    def contribution() -> Contribution:
        return Contribution(total=np.zeros(SIZE, dtype=np.float64)) if world.is_coordinator \
            else Contribution(total=update_of(world.rank).astype(np.float64),
                              sites=(world.rank - 1,))

    ranks = tuple(range(1, world.size))
    outcome = RoundOutcome(round=3, ranks=ranks, contributors=ranks, in_sum=ranks,
                           rows_per_rank={}, refused=False)
    fixed = TRANSPORTS.get("fixed")(frac_bits=FRAC_BITS)
    mine = contribution()
    if not world.is_coordinator:
        _, error = fixed.prepare(mine, plan=RoundPlan(round=3, ranks=ranks), rank=world.rank)
        assert error is None
    got = fixed.aggregate(world, mine, outcome)
    num_sites = world.size - 1
    masked_total = None
    if num_sites >= 2:
        identities = None if world.is_coordinator else \
            SiteIdentities(KEYS, sites=[world.rank - 1], num_sites=num_sites)
        masks = TRANSPORTS.get("masks")(frac_bits=FRAC_BITS, mask_degree=0,
                                        identities=identities)
        masks.start_session(session_seed() or b"")
        masked = masks.aggregate(world, contribution(), RoundOutcome(
            round=3, ranks=ranks, contributors=tuple(r - 1 for r in ranks),
            in_sum=tuple(r - 1 for r in ranks), rows_per_rank={}, refused=False))
        masked_total = None if masked is None else masked.total
    if not world.is_coordinator:
        assert got is None
        return
    integers = [quantize(update_of(r).astype(np.float64), frac_bits=FRAC_BITS).view(np.int64)
                .astype(object) for r in reversed(ranks)]
    exact = np.array([int(v) % 2**64 for v in np.sum(integers, axis=0)], dtype=np.uint64)
    expected = dequantize(exact, frac_bits=FRAC_BITS, out=np.empty(SIZE, dtype=np.float64))
    assert got is not None and got.total is mine.total
    assert np.array_equal(got.total, expected)
    if masked_total is not None:
        assert np.array_equal(masked_total, got.total)


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
