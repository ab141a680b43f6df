"""MPI tests of the encrypted sum (run under ``mpirun -n N``, N >= 2): ciphertexts added
at the key-less coordinator, decrypted by one participant."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
from harness import run_tests

from fedsilo.comm import AGGREGATOR, World
from fedsilo.crypto import CODECS
from fedsilo.crypto.ckks import COORDINATOR_FILE, PARTICIPANT_FILE, generate_keys, load_keys
from fedsilo.crypto.params import CKKSParams
from fedsilo.errors import KeyFileError

world = World()
SIZE = 3 * 4096 + 17  # several ciphertexts, the last one partly filled

if world.is_coordinator:
    _tmp = tempfile.mkdtemp(prefix="fedsilo-he-suite-")
    atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
    generate_keys(Path(_tmp) / "keys", CKKSParams(), num_participants=16)
    KEYS = world.bcast_obj(str(Path(_tmp) / "keys"))
else:
    KEYS = Path(world.bcast_obj(None))
KEYS = Path(KEYS)


def update_of(rank: int) -> np.ndarray:
    """Participant ``rank``'s pre-weighted update (any rank can recompute it, for checking)."""
    rng = np.random.default_rng(rank)
    return (rng.standard_normal(SIZE) * 1e-3 / max(world.num_participants, 1)).astype(np.float32)


def test_coordinator_adds_every_participant_with_the_identity_codec() -> None:
    codec = CODECS.get("identity")()
    payload = codec.to_bytes(codec.encrypt(np.full(1001, float(world.rank), np.float32)))
    total = world.add_at_coordinator(None if world.is_coordinator else payload, codec=codec)
    if world.is_coordinator:
        assert np.array_equal(total, np.full(1001, sum(range(1, world.size)),
                                             np.float32)), total[:3]
    else:
        assert total is None


def test_relay_delivers_the_aggregate_and_info_to_the_coordinator() -> None:
    buffer = np.full(513, 7.0 if world.rank == AGGREGATOR else -1.0, dtype=np.float32)
    info = world.relay_to_coordinator(buffer, {"from": world.rank})
    if world.is_coordinator:
        assert np.all(buffer == 7.0) and info == {"from": AGGREGATOR}
    else:
        assert info is None


def test_encrypted_sum_equals_the_plaintext_sum() -> None:
    aggregate = np.zeros(SIZE, dtype=np.float32)
    if world.is_coordinator:
        keys = load_keys(KEYS / COORDINATOR_FILE, expect="coordinator")
        assert not keys.is_private
        codec = CODECS.get("ckks")(keys=keys)  # adds, cannot decrypt
        total = world.add_at_coordinator(None, codec=codec)
        world.send_to_aggregator(codec.to_bytes(total))
    else:
        keys = load_keys(KEYS / PARTICIPANT_FILE, expect="participant")
        codec = CODECS.get("ckks")(keys=keys)
        payload = codec.to_bytes(codec.encrypt(update_of(world.rank)))
        world.add_at_coordinator(payload, codec=codec)
        data = world.receive_total()
        if data is not None:
            codec.decrypt_into(codec.from_bytes(data), aggregate)
    world.relay_to_coordinator(aggregate, None)
    if not world.is_coordinator:  # a fresh ciphertext: 8 B per value at most (seeded, two
        # values per slot), values come in ciphertexts of N
        num_values = -(-SIZE // keys.params.poly_modulus_degree) * keys.params.poly_modulus_degree
        assert len(payload) <= 8 * num_values, len(payload) / num_values
    if world.is_coordinator:
        exact = np.sum([update_of(r).astype(np.float64) for r in range(1, world.size)], axis=0)
        error = np.abs(aggregate - exact).max()
        # the CKKS bound plus float32 rounding of the delivered aggregate
        assert error <= keys.params.error_bound(world.num_participants) + 1e-9, error
        assert np.linalg.norm(aggregate - exact) / np.linalg.norm(exact) < 1e-6


def test_the_coordinator_sees_ciphertexts_it_cannot_decrypt() -> None:
    """What a participant sends is not plaintext, and the coordinator's context cannot
    decrypt it (here each participant sends its ciphertext to the coordinator on purpose)."""
    if world.is_coordinator:
        keys = load_keys(KEYS / COORDINATOR_FILE, expect="coordinator")
        codec = CODECS.get("ckks")(keys=keys)
        assert not keys.context.is_private() and not keys.context.has_secret_key()
        received = {rank: world.comm.recv(source=rank, tag=99) for rank in range(1, world.size)}
        for rank, data in received.items():
            plain = update_of(rank)
            for start in range(0, SIZE - 4, SIZE // 7):  # no 16-byte run of the update
                assert plain[start:start + 4].tobytes() not in data
            ciphertext = codec.from_bytes(data)
            try:
                codec.decrypt_into(ciphertext, np.empty(SIZE, dtype=np.float32))
            except KeyFileError as exc:
                assert "participant key" in str(exc)
            else:
                raise AssertionError("the coordinator decrypted an update")
        # and not only fedsilo's check: its context has no key to decrypt with
        assert codec.seal.decryptor is None
        try:
            keys.context.secret_key()
        except ValueError as exc:
            assert "secret key" in str(exc).lower()
        else:
            raise AssertionError("the coordinator's context holds a secret key")
    else:
        codec = CODECS.get("ckks")(keys=load_keys(KEYS / PARTICIPANT_FILE, expect="participant"))
        world.comm.send(codec.to_bytes(codec.encrypt(update_of(world.rank))), dest=0, tag=99)


if __name__ == "__main__":
    run_tests(dict(globals()))
