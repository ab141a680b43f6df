"""Pairwise-masked secure aggregation: fixed point, masks, mask graph, identity keys.

Every check compares against an independent computation (Python integers, a direct
ChaCha20 stream, a breadth-first search), never against the code path under test.
"""

import ast
import base64
import doctest
import json
import os
import stat
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo.crypto import identity, masks
from fedsilo.crypto.identity import (
    fingerprint,
    generate_identities,
    load_identity,
    load_public_keys,
)
from fedsilo.crypto.masks import (
    FRAC_BITS,
    add_masks,
    check_headroom,
    dequantize,
    mask_graph,
    pair_key,
    quantize,
    sparse_degree,
)
from fedsilo.errors import ConfigError, KeyFileError, UpdateError

NONCE = b"\x01\x02\x03\x04\x05\x06\x07\x08"
RING = 2 ** 64


def keys_for(graph, private):
    """Pair keys of every site, computed the way each site would on its own rank."""
    return {s: {j: pair_key(private[s], private[j].public_key(), own_site=s, peer_site=j)
                for j in peers} for s, peers in graph.items()}


def masked_vectors(values, *, degree, seed=b"seed", round_index=3, nonce=NONCE):
    sites = sorted(values)
    private = {s: X25519PrivateKey.generate() for s in sites}
    graph = mask_graph(sites, degree=degree, seed=seed)
    keys = keys_for(graph, private)
    out = {}
    for s in sites:
        vector = quantize(values[s], frac_bits=FRAC_BITS)
        add_masks(vector, site=s, pair_keys=keys[s], round_index=round_index, nonce=nonce)
        out[s] = vector
    return out, graph


def exact_fixed_point(values):
    """round-half-even(v * 2^32) in Python integers: an independent quantizer."""
    return [round(float(v) * 2 ** FRAC_BITS) for v in values]


def connected(graph):
    start = next(iter(graph))
    seen, todo = {start}, deque([start])
    while todo:
        for j in graph[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return seen == set(graph)


# --- masks cancel ---------------------------------------------------------------------------

site_sets = st.sets(st.integers(0, 40), min_size=2, max_size=12)
float32s = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sites=site_sets, length=st.integers(1, 40), dense=st.booleans(), data=st.data())
def test_masks_cancel_exactly(sites, length, dense, data):
    values = {s: np.array(data.draw(st.lists(float32s, min_size=length, max_size=length)),
                          dtype=np.float32) for s in sites}
    degree = None if dense else data.draw(st.integers(1, len(sites)))
    vectors, _ = masked_vectors(values, degree=degree)
    total = np.zeros(length, dtype=np.uint64)
    for vector in vectors.values():
        total += vector  # what MPI_Reduce(SUM) does on uint64
    # independent: the sum of exact integer fixed points, reduced modulo 2^64 by Python
    expected = [sum(col) for col in zip(*(exact_fixed_point(values[s]) for s in sites))]
    assert total.tolist() == [e % RING for e in expected]
    result = dequantize(total, frac_bits=FRAC_BITS, out=np.empty(length))
    assert result.tolist() == [e * 2.0 ** -FRAC_BITS for e in expected]
    float_sum = np.sum([values[s].astype(np.float64) for s in sites], axis=0)
    assert np.all(np.abs(result - float_sum) <= len(sites) * 2.0 ** -(FRAC_BITS + 1))


def test_masked_vectors_are_not_the_updates():
    values = {s: np.full(1000, 0.5, dtype=np.float32) for s in range(5)}
    vectors, graph = masked_vectors(values, degree=2)
    plain = quantize(values[0], frac_bits=FRAC_BITS)
    for s, vector in vectors.items():
        assert len(graph[s]) == 2
        assert np.count_nonzero(vector == plain) == 0


def test_mask_is_the_specified_chacha20_stream():
    # the wire format of the masks, so another implementation can interoperate
    key, length = bytes(range(32)), 1000
    stream = Cipher(algorithms.ChaCha20(key, bytes(4) + (9).to_bytes(4, "little") + NONCE),
                    mode=None).encryptor().update(bytes(8 * length))
    mask = np.frombuffer(stream, dtype="<u8")
    up = np.zeros(length, dtype=np.uint64)
    add_masks(up, site=2, pair_keys={5: key}, round_index=9, nonce=NONCE)
    assert up.tolist() == mask.tolist()
    down = np.zeros(length, dtype=np.uint64)
    add_masks(down, site=5, pair_keys={2: key}, round_index=9, nonce=NONCE)
    assert down.tolist() == [(-int(m)) % RING for m in mask]


def test_chunking_does_not_change_the_masks(monkeypatch):
    keys = {1: bytes(32), 3: bytes(range(32))}
    whole = np.arange(1003, dtype=np.uint64)
    add_masks(whole, site=2, pair_keys=keys, round_index=0, nonce=NONCE)
    monkeypatch.setattr(masks, "CHUNK_VALUES", 100)
    chunked = np.arange(1003, dtype=np.uint64)
    add_masks(chunked, site=2, pair_keys=keys, round_index=0, nonce=NONCE)
    assert np.array_equal(whole, chunked)


def test_add_masks_wraps_without_floats():
    key = bytes(range(32))
    vector = np.full(64, RING - 1, dtype=np.uint64)
    mask = np.zeros(64, dtype=np.uint64)
    add_masks(mask, site=0, pair_keys={1: key}, round_index=0, nonce=NONCE)
    add_masks(vector, site=0, pair_keys={1: key}, round_index=0, nonce=NONCE)
    assert vector.dtype == np.uint64
    assert vector.tolist() == [(RING - 1 + int(m)) % RING for m in mask]


# --- a masked vector hides the update -----------------------------------------------------

def single_masked(update, *, round_index=0, nonce=NONCE, key=bytes(range(32))):
    vector = quantize(update, frac_bits=FRAC_BITS)
    add_masks(vector, site=0, pair_keys={1: key, 2: bytes(range(1, 33))},
              round_index=round_index, nonce=nonce)
    return vector


def uniform_stats(vector):
    top = (vector >> np.uint64(63)).astype(np.float64)
    unit = (vector >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return top.mean(), unit.mean(), np.histogram(unit, bins=16, range=(0, 1))[0]


def test_masked_vector_looks_uniform_and_uncorrelated():
    rng = np.random.default_rng(0)
    n = 100_000
    update = rng.normal(scale=1e2, size=n).astype(np.float32)
    vector = single_masked(update)
    corr = np.corrcoef(vector.view(np.int64).astype(np.float64), update)[0, 1]
    assert abs(corr) < 0.05
    for masked in (vector, single_masked(np.zeros(n, dtype=np.float32)),
                   single_masked(np.full(n, 1e3, dtype=np.float32))):
        top, mean, counts = uniform_stats(masked)
        assert abs(top - 0.5) < 0.01 and abs(mean - 0.5) < 0.01
        chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
        assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 45


def test_mask_does_not_depend_on_the_update():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=5000).astype(np.float32), np.full(5000, 7.0, dtype=np.float32)
    mask_a = single_masked(a) - quantize(a, frac_bits=FRAC_BITS)
    mask_b = single_masked(b) - quantize(b, frac_bits=FRAC_BITS)
    assert np.array_equal(mask_a, mask_b)
    assert np.count_nonzero(mask_a) == mask_a.size


def test_masks_differ_between_rounds_and_nonces():
    zero = np.zeros(5000, dtype=np.float32)
    base = single_masked(zero, round_index=1)
    assert np.array_equal(base, single_masked(zero, round_index=1))
    for other in (single_masked(zero, round_index=2), single_masked(zero, nonce=b"another!"),
                  single_masked(zero, round_index=1, key=bytes(32))):
        assert np.count_nonzero(base == other) < 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(vector=np.zeros(3, dtype=np.int64)), "uint64"),
    (dict(vector=np.zeros((2, 2), dtype=np.uint64)), "1-D"),
    (dict(vector=np.zeros(6, dtype=np.uint64)[::2]), "not contiguous"),
    (dict(nonce=b"short"), "8 bytes"),
    (dict(round_index=-1), "round_index"),
    (dict(round_index=2 ** 32), "round_index"),
    (dict(pair_keys={1: b"short"}), "32 bytes"),
    (dict(pair_keys={0: bytes(32)}), "itself"),
])
def test_add_masks_validates(kwargs, match):
    args = dict(vector=np.zeros(3, dtype=np.uint64), site=0, pair_keys={1: bytes(32)},
                round_index=0, nonce=NONCE)
    args.update(kwargs)
    vector = args.pop("vector")
    with pytest.raises(UpdateError, match=match):
        add_masks(vector, **args)


# --- fixed point ------------------------------------------------------------------------------

@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50))
def test_quantize_is_exact_twos_complement_rounding(values):
    array = np.array(values, dtype=np.float64)
    assert quantize(array, frac_bits=FRAC_BITS).tolist() == \
        [v % RING for v in exact_fixed_point(values)]
    back = dequantize(quantize(array, frac_bits=FRAC_BITS), frac_bits=FRAC_BITS,
                      out=np.empty(len(values)))
    assert np.all(np.abs(back - array) <= 2.0 ** -(FRAC_BITS + 1))


def test_quantize_into_out_and_float32_result():
    values = np.array([0.1, -2.5, 3e-10, -1e3], dtype=np.float32)
    out = np.full(4, 99, dtype=np.uint64)
    assert quantize(values, frac_bits=FRAC_BITS, out=out) is out
    assert out.tolist() == [v % RING for v in exact_fixed_point(values)]
    result = dequantize(out, frac_bits=FRAC_BITS, out=np.empty(4, dtype=np.float32))
    assert result.dtype == np.float32 and np.allclose(result, values, rtol=0, atol=1e-9)


def test_quantize_in_chunks_and_any_shape(monkeypatch):
    values = np.random.default_rng(2).normal(scale=50, size=(7, 151))
    expected = [v % RING for v in exact_fixed_point(values.reshape(-1))]
    monkeypatch.setattr(masks, "CHUNK_VALUES", 100)
    result = quantize(values, frac_bits=FRAC_BITS)
    assert result.shape == (7, 151) and result.reshape(-1).tolist() == expected
    assert quantize(np.zeros(0), frac_bits=FRAC_BITS).size == 0


def test_quantize_and_dequantize_validate():
    with pytest.raises(UpdateError, match="float32 or float64"):
        quantize(np.zeros(3, dtype=np.int32), frac_bits=8)
    with pytest.raises(UpdateError, match="uint64 array of shape"):
        quantize(np.zeros(3), frac_bits=8, out=np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError, match="frac_bits"):
        quantize(np.zeros(3), frac_bits=63)
    with pytest.raises(UpdateError, match="uint64"):
        dequantize(np.zeros(3, dtype=np.int64), frac_bits=8, out=np.empty(3))
    with pytest.raises(UpdateError, match="shape"):
        dequantize(np.zeros(3, dtype=np.uint64), frac_bits=8, out=np.empty(4))


# --- headroom -------------------------------------------------------------------------------

def test_headroom_boundary_is_exact():
    # 16 * (x * 2^32 + 1) < 2^62  <=>  x < 2^26 - 2^-32; the float just below 2^26 passes
    below = np.nextafter(2.0 ** 26, 0)
    check_headroom(below, frac_bits=32, num_terms=16)
    with pytest.raises(UpdateError) as info:
        check_headroom(2.0 ** 26, frac_bits=32, num_terms=16)
    message = str(info.value)
    assert "6.711e+07" in message and "16 terms" in message and "frac_bits=32" in message
    assert "train.lr" in message and "aggregation.frac_bits" in message


@given(frac_bits=st.integers(0, 52), num_terms=st.integers(1, 10_000))
def test_headroom_matches_integer_bound(frac_bits, num_terms):
    limit = (2 ** 62 // num_terms - 1) / 2 ** frac_bits
    check_headroom(limit * 0.999, frac_bits=frac_bits, num_terms=num_terms)
    with pytest.raises(UpdateError):
        check_headroom(limit * 1.001 + 2.0 ** -frac_bits, frac_bits=frac_bits, num_terms=num_terms)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_headroom_refuses_non_finite(bad):
    with pytest.raises(UpdateError, match="non-finite"):
        check_headroom(bad, frac_bits=32, num_terms=4)


def test_headroom_guarantees_exact_sums():
    # the largest admissible values, all of one sign, sum without touching the sign bit
    num_terms, x = 8, np.nextafter((2.0 ** 62 / 8 - 1) / 2.0 ** 32, 0)
    check_headroom(x, frac_bits=32, num_terms=num_terms)
    total = np.zeros(1, dtype=np.uint64)
    for _ in range(num_terms):
        total += quantize(np.array([-x]), frac_bits=32)
    assert dequantize(total, frac_bits=32, out=np.empty(1))[0] == -x * num_terms


# --- the mask graph -------------------------------------------------------------------------

@settings(max_examples=60)
@given(sites=st.sets(st.integers(0, 200), min_size=1, max_size=60),
       degree=st.one_of(st.none(), st.integers(1, 70)), seed=st.binary(min_size=1, max_size=16))
def test_graph_invariants(sites, degree, seed):
    graph = mask_graph(sorted(sites, reverse=True), degree=degree, seed=seed)
    n = len(sites)
    assert set(graph) == sites
    expected = n - 1 if degree is None else min(degree + degree % 2, n - 1)
    for i, peers in graph.items():
        assert i not in peers and set(peers) <= sites and len(set(peers)) == len(peers)
        assert len(peers) == expected
        assert all(i in graph[j] for j in peers)
    assert connected(graph)
    assert graph == mask_graph(sorted(sites), degree=degree, seed=seed)  # input order is irrelevant


def test_graph_dense_when_degree_large():
    sites = [3, 1, 4, 9]
    dense = {1: [3, 4, 9], 3: [1, 4, 9], 4: [1, 3, 9], 9: [1, 3, 4]}
    for degree in (None, 3, 4, 100):
        assert mask_graph(sites, degree=degree, seed=b"x") == dense
    # degree 2 on 5 sites is a ring, not dense
    assert {len(p) for p in mask_graph(range(5), degree=2, seed=b"x").values()} == {2}


def test_graph_depends_on_seed_only():
    sites = list(range(30))
    a = mask_graph(sites, degree=4, seed=b"alpha")
    assert a == mask_graph(sites, degree=4, seed=b"alpha")
    assert a != mask_graph(sites, degree=4, seed=b"beta")


@pytest.mark.parametrize("sites, degree, seed, match", [
    ([], None, b"s", "site indexes"),
    ([0, 0, 1], None, b"s", "distinct"),
    ([0, -1], None, b"s", "site indexes"),
    ([0, "1"], None, b"s", "site indexes"),
    ([0, 1, 2], 0, b"s", "degree"),
    ([0, 1, 2], None, b"", "seed"),
])
def test_graph_validates(sites, degree, seed, match):
    with pytest.raises(ConfigError, match=match):
        mask_graph(sites, degree=degree, seed=seed)


@pytest.mark.parametrize("n, k", [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (8, 6), (9, 8), (10, 8),
                                  (16, 8), (17, 10), (64, 12), (65, 14), (1024, 20), (1025, 22)])
def test_sparse_degree(n, k):
    assert sparse_degree(n) == k


@given(st.integers(1, 100_000))
def test_sparse_degree_is_log(n):
    k = sparse_degree(n)
    bound = 2 * int(np.ceil(np.log2(n))) if n > 1 else 0
    assert k == min(bound, n - 1) and (k == n - 1 or k % 2 == 0)


# --- pair keys ------------------------------------------------------------------------------

def test_pair_key_is_symmetric_and_pair_specific():
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    ab = pair_key(a, b.public_key(), own_site=0, peer_site=1)
    assert len(ab) == 32
    assert ab == pair_key(b, a.public_key(), own_site=1, peer_site=0)
    assert ab != pair_key(a, c.public_key(), own_site=0, peer_site=2)
    assert ab != pair_key(c, b.public_key(), own_site=2, peer_site=1)
    # the same two keys labelled as another pair of sites give another key
    assert ab != pair_key(a, b.public_key(), own_site=0, peer_site=5)
    with pytest.raises(UpdateError, match="two different sites"):
        pair_key(a, b.public_key(), own_site=1, peer_site=1)


def test_derive_pair_keys_matches_pair_key():
    private = {s: X25519PrivateKey.generate() for s in range(4)}
    public = {s: k.public_key() for s, k in private.items()}
    keys = masks.derive_pair_keys(private[2], site=2, neighbours=[0, 3], public_keys=public)
    assert keys == {j: pair_key(private[j], public[2], own_site=j, peer_site=2) for j in (0, 3)}
    with pytest.raises(KeyFileError, match=r"site\(s\) \[7\]"):
        masks.derive_pair_keys(private[2], site=2, neighbours=[7], public_keys=public)


# --- identity files -------------------------------------------------------------------------

def test_identity_files_and_modes(tmp_path):
    paths = generate_identities(tmp_path / "ids", num_sites=3)
    names = [p.name for p in paths]
    assert names == ["site-000.key", "site-001.key", "site-002.key", "public.json"]
    for path in paths[:-1]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    assert stat.S_IMODE(paths[-1].stat().st_mode) == 0o644
    document = json.loads(paths[-1].read_text())
    assert document["format"] == "fedsilo-identity" and document["version"] == 1
    assert sorted(document["sites"]) == ["0", "1", "2"]


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277])
def test_identity_modes_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = generate_identities(tmp_path, num_sites=2)
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o600, 0o600, 0o644]


def test_identity_round_trip(tmp_path):
    generate_identities(tmp_path, num_sites=4)
    public = load_public_keys(tmp_path)
    assert sorted(public) == [0, 1, 2, 3]
    document = json.loads((tmp_path / "public.json").read_text())
    for site in range(4):
        own = load_identity(tmp_path, site, public_keys=public)
        raw = own.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        assert base64.b64decode(document["sites"][str(site)]["public_key"]) == raw
        assert fingerprint(own.public_key()) == document["sites"][str(site)]["fingerprint"]
    # keys loaded from files agree pairwise
    own0, own1 = (load_identity(tmp_path, s, public_keys=public) for s in (0, 1))
    k01 = pair_key(own0, public[1], own_site=0, peer_site=1)
    k10 = pair_key(own1, public[0], own_site=1, peer_site=0)
    assert k01 == k10


def test_identity_refuses_to_overwrite(tmp_path):
    generate_identities(tmp_path, num_sites=2)
    before = (tmp_path / "site-000.key").read_bytes()
    with pytest.raises(KeyFileError, match="already exist"):
        generate_identities(tmp_path, num_sites=3)
    assert (tmp_path / "site-000.key").read_bytes() == before
    assert not (tmp_path / "site-002.key").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "public.json").write_text("{}")
    with pytest.raises(KeyFileError, match="public.json already exist"):
        generate_identities(tmp_path / "other", num_sites=2)
    with pytest.raises(KeyFileError, match="at least 2 sites"):
        generate_identities(tmp_path / "third", num_sites=1)


def test_identity_never_overwrites_even_in_a_race(tmp_path, monkeypatch):
    generate_identities(tmp_path, num_sites=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    modes = {d: d.stat().st_mode for d in (tmp_path, tmp_path.parent, Path("/"))}
    (tmp_path / "site-000.key").unlink()
    monkeypatch.setattr(Path, "exists", lambda self: False)  # as if created after the check
    with pytest.raises(KeyFileError, match="site-001.key appeared while writing"):
        generate_identities(tmp_path, num_sites=2)
    monkeypatch.undo()
    # directories it did not create keep their mode (it once made / and /tmp 0700 here)
    assert {d: d.stat().st_mode for d in modes} == modes
    assert not (tmp_path / "site-000.key").exists()  # the half-written set was removed
    assert (tmp_path / "site-001.key").read_bytes() == before["site-001.key"]
    assert (tmp_path / "public.json").read_bytes() == before["public.json"]


def test_foreign_key_is_detected(tmp_path):
    generate_identities(tmp_path / "a", num_sites=2)
    generate_identities(tmp_path / "b", num_sites=2)
    public = load_public_keys(tmp_path / "a")
    os.replace(tmp_path / "b" / "site-001.key", tmp_path / "a" / "site-001.key")
    with pytest.raises(KeyFileError) as info:
        load_identity(tmp_path / "a", 1, public_keys=public)
    assert "site-001.key does not match the public key listed for site 1 in public.json" \
        in str(info.value)
    assert "foreign or replaced" in str(info.value)
    load_identity(tmp_path / "a", 0, public_keys=public)  # the others still load


def test_non_x25519_key_is_foreign(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    generate_identities(tmp_path, num_sites=2)
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = tmp_path / "site-000.key"
    path.write_bytes(other)
    with pytest.raises(KeyFileError, match="not an unencrypted X25519 PEM private key"):
        load_identity(tmp_path, 0, public_keys=load_public_keys(tmp_path))
    path.write_bytes(b"garbage")
    with pytest.raises(KeyFileError, match="foreign key"):
        load_identity(tmp_path, 0, public_keys=load_public_keys(tmp_path))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(KeyFileError) as info:
        load_public_keys(tmp_path)
    assert str(tmp_path / "public.json") in str(info.value)
    assert "fedsilo keys --identity --sites P --out DIR" in str(info.value)
    generate_identities(tmp_path, num_sites=2)
    public = load_public_keys(tmp_path)
    (tmp_path / "site-001.key").unlink()
    with pytest.raises(KeyFileError) as info:
        load_identity(tmp_path, 1, public_keys=public)
    assert str(tmp_path / "site-001.key") in str(info.value) and "does not exist" in str(info.value)
    with pytest.raises(KeyFileError, match="site 5 is not listed in public.json"):
        load_identity(tmp_path, 5, public_keys=public)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_readable_key_is_refused(tmp_path, mode):
    generate_identities(tmp_path, num_sites=2)
    path = tmp_path / "site-000.key"
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 600"):
        load_identity(tmp_path, 0, public_keys=load_public_keys(tmp_path))
    path.chmod(0o400)  # owner read-only is fine
    load_identity(tmp_path, 0, public_keys=load_public_keys(tmp_path))


def tamper(path: Path, edit):
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _swap_keys(doc):
    s = doc["sites"]
    s["0"]["public_key"], s["1"]["public_key"] = s["1"]["public_key"], s["0"]["public_key"]


def _replace_key(doc):
    doc["sites"]["0"]["public_key"] = base64.b64encode(
        X25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    doc["sites"]["0"].pop("fingerprint")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="other"), "not a fedsilo-identity version 1"),
    (lambda d: d.update(version=2), "not a fedsilo-identity version 1"),
    (lambda d: d["sites"].update({"4": d["sites"]["0"]}), "without gaps"),
    (lambda d: d["sites"].update({"x": d["sites"]["0"]}), "decimal integers"),
    (lambda d: d["sites"]["1"].update(public_key="***"), "not base64"),
    (lambda d: d["sites"]["1"].update(public_key=base64.b64encode(bytes(31)).decode()),
     "32 raw bytes"),
    (_swap_keys, "fingerprint of site 0 .* does not match"),
])
def test_tampered_public_json_is_refused(tmp_path, edit, match):
    generate_identities(tmp_path, num_sites=3)
    tamper(tmp_path / "public.json", edit)
    with pytest.raises(KeyFileError, match=match):
        load_public_keys(tmp_path)


def test_replaced_public_key_is_caught_by_the_private_key(tmp_path):
    generate_identities(tmp_path, num_sites=2)
    tamper(tmp_path / "public.json", _replace_key)
    public = load_public_keys(tmp_path)  # consistent file, but not this set's key
    with pytest.raises(KeyFileError, match="does not match the public key listed for site 0"):
        load_identity(tmp_path, 0, public_keys=public)


def test_bad_json_is_refused(tmp_path):
    (tmp_path / "public.json").write_text("{not json")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        load_public_keys(tmp_path)


# --- documentation and layering -------------------------------------------------------------

@pytest.mark.parametrize("module", [masks, identity])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("module", [masks, identity])
def test_pure(module):
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"torch", "mpi4py", "h5py", "tenseal"}


@pytest.mark.parametrize("degree", [None, 2])
def test_no_partial_sum_of_the_reduction_reveals_its_updates(degree):
    """What any node of the MPI_Reduce tree holds is a sum over a proper subset of the sites
    (the coordinator, at the root, the full sum).  For every proper subset S, Σ_S masked
    must look uniform in the ring and be uncorrelated with Σ_S update, while the full sum
    is exactly the sum of the updates."""
    rng = np.random.default_rng(7)
    num_sites, length = 6, 20_000
    values = {s: (rng.standard_normal(length) * 1e-2).astype(np.float32)
              for s in range(num_sites)}
    masked, _ = masked_vectors(values, degree=degree)
    import itertools

    for size in range(1, num_sites):
        for subset in itertools.combinations(range(num_sites), size):
            partial = sum(masked[s] for s in subset)  # uint64: wraps like the Reduce
            plain = np.sum([values[s] for s in subset], axis=0).astype(np.float64)
            as_float = partial.view(np.int64).astype(np.float64)
            # uniform over the ring: about half the values have the top bit set
            assert 0.45 < float((partial >> np.uint64(63)).mean()) < 0.55, subset
            assert abs(np.corrcoef(as_float, plain)[0, 1]) < 0.05, subset
    total = sum(masked[s] for s in range(num_sites))
    exact = sum(quantize(values[s], frac_bits=FRAC_BITS) for s in range(num_sites))
    assert np.array_equal(total, exact)


def test_fixed_point_sums_do_not_depend_on_the_order_where_float64_sums_do():
    """Why runtime.reduce_dtype: fixed exists: three ranks' float64 sums whose magnitudes
    span more than 2^53 add up to different bits in different orders (what Open MPI's
    hierarchical Reduce does across nodes); their fixed-point encodings add up to the same
    integers in every order."""
    from itertools import permutations

    from fedsilo.transport import TRANSPORTS, transport_for

    parts = [np.array([2.0 ** 20, 0.1], dtype=np.float64),
             np.array([3.0 * 2.0 ** -31, 0.2], dtype=np.float64),
             np.array([-(2.0 ** 20), 0.3], dtype=np.float64)]
    float_sums = {tuple((a + b) + c) for a, b, c in permutations(parts)}
    assert len(float_sums) > 1  # the trap is real
    fixed_sums = set()
    for a, b, c in permutations(parts):
        ring = quantize(a, frac_bits=32) + quantize(b, frac_bits=32) + quantize(c, frac_bits=32)
        fixed_sums.add(tuple(dequantize(ring, frac_bits=32, out=np.empty(2))))
    assert len(fixed_sums) == 1
    (total,) = fixed_sums
    assert total[0] == 3.0 * 2.0 ** -31 and abs(total[1] - 0.6) < 2.0 ** -32

    class Config:  # only the fields transport_for reads
        class aggregation:
            secure, frac_bits = "none", 24

        class runtime:
            reduce_dtype = "fixed"

    class Linear:
        linear = True

    chosen = transport_for(Config, Linear)
    assert isinstance(chosen, TRANSPORTS.get("fixed")) and chosen.frac_bits == 24
