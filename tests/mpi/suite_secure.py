"""MPI tests of the secure transports (run under ``mpirun -n N``, N >= 2): what each rank
receives, recorded at the communicator, and what it can open with everything it holds."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fedsilo.comm import AGGREGATOR, World
from fedsilo.crypto import CODECS
from fedsilo.crypto.ckks import COORDINATOR_FILE, PARTICIPANT_FILE, generate_keys, load_keys
from fedsilo.crypto.params import CKKSParams
from fedsilo.transport import TRANSPORTS
from harness import run_tests

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


class CKKSRole:
    """What the CKKS transport reads of a role: the payload, codec, float buffer."""

    def __init__(self) -> None:
        kind = COORDINATOR_FILE if world.is_coordinator else PARTICIPANT_FILE
        self.keys = load_keys(KEYS / kind, expect="coordinator" if world.is_coordinator
                              else "participant")
        self.codec = CODECS.get("ckks")(keys=self.keys)
        self.reduce_buffer = np.zeros(SIZE, dtype=np.float32)
        self.payload = None if world.is_coordinator else \
            self.codec.to_bytes(self.codec.encrypt(update_of(world.rank)))

    def decrypt_aggregate(self, total) -> dict:
        self.codec.decrypt_into(total, self.reduce_buffer)
        return {"decrypt_s": 0.0}


def test_ckks_sum_reaches_the_coordinator_and_no_participant_sees_another_update() -> None:
    """The attack of the secure-aggregation issue: a participant decrypts, with the shared
    key it holds, every message that reached it.  The old binomial tree handed rank 1 the
    ciphertexts of ranks 2 and 3 alone (decryption error 1e-11); here the only thing a
    participant can ever decrypt is the total, which is the aggregate it is meant to see."""
    recording = RecordingComm(world.comm.Dup())
    team = World(recording, _dup=False)
    role = CKKSRole()
    TRANSPORTS.get("ckks")().aggregate(team, role, outcome={})
    exact = np.sum([update_of(r).astype(np.float64) for r in range(1, world.size)], axis=0)
    if world.is_coordinator:
        assert np.abs(role.reduce_buffer - exact).max() < 1e-6
        assert not role.keys.is_private  # it added ciphertexts it cannot open
        return
    opened = 0
    for message in recording.received:
        if not isinstance(message, (bytes, bytearray)):
            continue
        try:
            values = np.asarray(role.codec.from_bytes(message).decrypt(), dtype=np.float64)
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
    """The real MaskedReduce path with every participant rank a site (P = ranks - 1): what
    a rank sends into the Reduce is uniformly masked, and the coordinator's dequantized sum
    equals the float64 sum within P · 2^-33 per value."""
    from fedsilo.crypto.identity import generate_identities, load_identity, load_public_keys
    from fedsilo.crypto.masks import (FRAC_BITS, add_masks, dequantize, mask_graph, pair_key,
                                      quantize)

    num_sites = world.size - 1
    if num_sites < 2:
        return  # one site has no one to mask with (and the floor refuses such a round)
    key_dir = KEYS.parent / "identities"
    if world.is_coordinator:
        generate_identities(key_dir, num_sites=num_sites)
    world.quiet_barrier()
    nonce, round_index = b"12345678", 7
    buffer = np.zeros(SIZE, dtype=np.uint64)
    if not world.is_coordinator:
        site = world.rank - 1
        publics = load_public_keys(key_dir)
        own = load_identity(key_dir, site, public_keys=publics)
        graph = mask_graph(list(range(num_sites)), degree=None, seed=b"graph")
        keys = {j: pair_key(own, publics[j], own_site=site, peer_site=j) for j in graph[site]}
        quantize(update_of(world.rank), frac_bits=FRAC_BITS, out=buffer)
        add_masks(buffer, site=site, pair_keys=keys, round_index=round_index, nonce=nonce)
        sent = buffer.view(np.int64).astype(np.float64)
        assert abs(np.corrcoef(sent, update_of(world.rank))[0, 1]) < 0.05
    world.reduce_ring(buffer)
    if world.is_coordinator:
        total = dequantize(buffer, frac_bits=FRAC_BITS, out=np.empty(SIZE, dtype=np.float64))
        exact = np.sum([update_of(r).astype(np.float64) for r in range(1, world.size)], axis=0)
        assert np.abs(total - exact).max() <= num_sites * 2.0 ** -33 + 1e-15


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
