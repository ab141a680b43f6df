"""Pairwise-masked secure aggregation in the ring Z_2^64, summed by one MPI_Reduce.

The protocol is the masking core of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), on the sparse mask graph of Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020, "SecAgg+"):

1. every site quantizes its (already weighted) float update to fixed point,
   ``round(x * 2^frac_bits)`` as a two's-complement ``uint64`` (:func:`quantize`), after
   :func:`check_headroom` has proved that no sum can overflow;
2. every pair of neighbours ``i < j`` in the mask graph (:func:`mask_graph`) shares a key
   (:func:`pair_key`: X25519 between their static identity keys, then HKDF-SHA256);
   the mask ``m_ij`` is the ChaCha20 keystream of that key for this round and launch;
   site ``i`` adds it and site ``j`` subtracts it (:func:`add_masks`);
3. the ranks add the ``uint64`` vectors with ``MPI_Reduce(SUM)``: unsigned wrap-around is
   exactly addition modulo 2^64, every mask cancels, and the coordinator turns the sum of
   the quantized updates back into floats (:func:`dequantize`).

Threat model (honest-but-curious, no dropouts: a failing rank ends the MPI job, so the
secret-sharing recovery of the papers is not needed).  A single participant, the
coordinator, and every rank that holds a partial sum inside the Reduce tree see only values
masked uniformly at random: the mask graph is connected, so every proper subset of sites
has an edge leaving it whose mask does not cancel.  A site's update is revealed only if
*all* of its neighbours in the graph collude with whoever sees its masked vector (for
the dense graph: all other sites); the coordinator learns the sum, as intended.  Masks
depend on the round index and on an 8-byte nonce the coordinator draws per job launch, so
no keystream is ever used twice: reusing one for two different updates would reveal their
difference.  The graph seed is public; a coordinator that could grind it to surround a
site with colluders is outside this model (use the dense graph against one).  Integrity is
not protected: a participant can still add garbage to the sum.

Fixed point: with :data:`FRAC_BITS` = 32 the step is 2^-32 ≈ 2.3e-10 per value (rounding
error at most half of that per site), and a sum of ``P`` terms is exact as long as every
``|value| < (2^62 / P - 1) / 2^32``, about 1.07e9 / P (one bit of margin below the int64
sign bit); :func:`check_headroom` enforces it.

The masks cancel for three sites:

>>> import numpy as np
>>> from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
>>> sites = [0, 1, 2]
>>> own = {s: X25519PrivateKey.generate() for s in sites}
>>> graph = mask_graph(sites, degree=None, seed=b"launch-seed")
>>> updates = {0: [0.5, -1.25], 1: [2.0, 0.125], 2: [-3.0, 1e-3]}
>>> nonce, total = b"8bytes!!", np.zeros(2, dtype=np.uint64)
>>> for s in sites:
...     keys = {j: pair_key(own[s], own[j].public_key(), own_site=s, peer_site=j)
...             for j in graph[s]}
...     vector = quantize(np.array(updates[s]), frac_bits=FRAC_BITS)
...     add_masks(vector, site=s, pair_keys=keys, round_index=7, nonce=nonce)
...     total += vector  # what MPI_Reduce(SUM) does, modulo 2^64
>>> dequantize(total, frac_bits=FRAC_BITS, out=np.empty(2)).round(6).tolist()
[-0.5, -1.124]
"""

from __future__ import annotations

import functools
import hashlib
import math
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedsilo.errors import ConfigError, KeyFileError, UpdateError

#: default fixed-point fraction bits: step 2^-32 ≈ 2.3e-10, |value| < ~1.07e9 / num_terms
FRAC_BITS = 32
#: fixed point never uses more than this many fraction bits (int64 needs room for the integer)
MAX_FRAC_BITS = 52
#: sums must stay below 2^62 in magnitude: one bit of margin below the int64 sign bit
HEADROOM_BITS = 62
#: HKDF salt of the pairwise mask keys; a new protocol version gets a new salt
PAIR_KEY_SALT = b"fedsilo-masks-v1"
#: bytes of a pairwise key (a ChaCha20 key)
KEY_BYTES = 32
#: bytes of the per-launch nonce the coordinator draws
NONCE_BYTES = 8
#: values masked per keystream chunk: bounds the temporary memory to 8 MiB
CHUNK_VALUES = 1 << 20
#: ChaCha20's 32-bit block counter covers 2^32 blocks of 64 bytes = 2^35 uint64 values
MAX_VALUES = 1 << 35

_GRAPH_DOMAIN = b"fedsilo-mask-graph-v1"


def quantize(values: np.ndarray, *, frac_bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """Fixed point: ``round(values * 2^frac_bits)`` as two's-complement ``uint64``.

    Rounds half to even (``np.rint`` in float64).  The caller proves the range first with
    :func:`check_headroom`; values beyond 2^63 / 2^frac_bits would not fit an int64.

    >>> quantize(np.array([1.0, -1.0, 0.25], dtype=np.float32), frac_bits=4).tolist()
    [16, 18446744073709551600, 4]
    """
    _check_frac_bits(frac_bits)
    if not isinstance(values, np.ndarray) or values.dtype not in (np.float32, np.float64):
        raise UpdateError(f"quantize needs a float32 or float64 array; got "
                          f"{getattr(values, 'dtype', type(values).__name__)}")
    if out is None:
        out = np.empty(values.shape, dtype=np.uint64)
    elif out.dtype != np.uint64 or out.shape != values.shape:
        raise UpdateError(f"quantize writes into a uint64 array of shape {values.shape}; got "
                          f"{out.dtype} of shape {out.shape}")
    if not out.flags.c_contiguous:  # written through a flat view
        raise UpdateError(f"quantize needs a contiguous output array; got {_describe(out)}")
    flat_in, flat_out = values.reshape(-1), out.reshape(-1).view(np.int64)
    scale = float(2 ** frac_bits)
    scratch = np.empty(min(flat_in.size, CHUNK_VALUES), dtype=np.float64)  # bounded temporary
    for start in range(0, flat_in.size, scratch.size or 1):
        part = flat_in[start:start + scratch.size]
        chunk = scratch[:part.size]
        np.multiply(part, scale, out=chunk, dtype=np.float64)  # exact: a power of two
        np.rint(chunk, out=chunk)
        np.copyto(flat_out[start:start + part.size], chunk, casting="unsafe")
    return out


def dequantize(total: np.ndarray, *, frac_bits: int, out: np.ndarray) -> np.ndarray:
    """Floats from fixed point: ``total`` viewed as int64, times 2^-frac_bits, into ``out``.

    >>> dequantize(np.array([16, 2**64 - 16, 4], dtype=np.uint64), frac_bits=4,
    ...            out=np.empty(3, dtype=np.float32)).tolist()
    [1.0, -1.0, 0.25]
    """
    _check_frac_bits(frac_bits)
    if not isinstance(total, np.ndarray) or total.dtype != np.uint64:
        raise UpdateError(f"dequantize needs a uint64 array; got "
                          f"{getattr(total, 'dtype', type(total).__name__)}")
    if out.dtype not in (np.float32, np.float64) or out.shape != total.shape:
        raise UpdateError(f"dequantize writes into a float32 or float64 array of shape "
                          f"{total.shape}; got {out.dtype} of shape {out.shape}")
    # a power-of-two scale is exact: the only rounding is int64 -> float
    np.multiply(total.view(np.int64), 2.0 ** -frac_bits, out=out, casting="same_kind")
    return out


def check_headroom(max_abs: float, *, frac_bits: int, num_terms: int) -> None:
    """Raise :class:`UpdateError` unless a sum of ``num_terms`` quantized values fits.

    Requires ``num_terms * (max_abs * 2^frac_bits + 1) < 2^62``: each quantized term is at
    most ``max_abs * 2^frac_bits`` plus rounding, and 2^62 keeps one bit of margin below the
    int64 sign.  Every partial sum inside the Reduce is then in range too.

    >>> check_headroom(1.0, frac_bits=32, num_terms=16)
    >>> check_headroom(1e8, frac_bits=32, num_terms=16)
    Traceback (most recent call last):
    ...
    fedsilo.errors.UpdateError: an update value of magnitude 1e+08 is too large for fixed-point aggregation: with aggregation.frac_bits=32 and 16 terms every |value| must stay under 6.711e+07 (2^62 / num_terms / 2^frac_bits, one bit of margin below the int64 sign); lower train.lr or aggregation.frac_bits
    """  # noqa: E501
    _check_frac_bits(frac_bits)
    if not _is_int(num_terms, low=1):
        raise UpdateError(f"check_headroom needs num_terms >= 1; got {num_terms!r}")
    max_abs = float(max_abs)
    if not math.isfinite(max_abs) or max_abs < 0:
        raise UpdateError(f"an update contains a non-finite or invalid magnitude "
                          f"(max |value| = {max_abs}); it cannot be aggregated")
    # exact rational arithmetic: the boundary is decided without float rounding
    if num_terms * (Fraction(max_abs) * 2 ** frac_bits + 1) < 2 ** HEADROOM_BITS:
        return
    limit = (2.0 ** HEADROOM_BITS / num_terms - 1) / 2.0 ** frac_bits
    raise UpdateError(
        f"an update value of magnitude {max_abs:.4g} is too large for fixed-point "
        f"aggregation: with aggregation.frac_bits={frac_bits} and {num_terms} terms every "
        f"|value| must stay under {limit:.4g} (2^{HEADROOM_BITS} / num_terms / 2^frac_bits, "
        f"one bit of margin below the int64 sign); lower train.lr or aggregation.frac_bits")


def sparse_degree(num_sites: int) -> int:
    """SecAgg+'s O(log n) neighbour count: the smallest even ``k >= 2*ceil(log2 n)``, at most n-1.

    With ``k`` of order log n the mask graph stays connected and a site is exposed only if
    all ``k`` neighbours collude, at a cost of ``k`` (not n-1) keystreams per site.

    >>> [sparse_degree(n) for n in (2, 3, 8, 16, 17, 100, 1000)]
    [1, 2, 6, 8, 10, 14, 20]
    """
    if not _is_int(num_sites, low=1):
        raise ConfigError(f"sparse_degree needs num_sites >= 1; got {num_sites!r}")
    return min(2 * (num_sites - 1).bit_length(), num_sites - 1)


def mask_graph(sites: Sequence[int], *, degree: int | None, seed: bytes) -> dict[int, list[int]]:
    """The neighbours each site masks with (symmetric, no self loops, same on every rank).

    ``degree`` None or ``>= len(sites) - 1`` gives the complete graph.  Otherwise the sorted
    sites are shuffled by a permutation derived from ``seed`` and each site is joined to
    the ``k/2`` next and previous sites on that ring, ``k`` = ``degree`` rounded up to even
    (a circulant Harary graph: connected, every site has exactly ``k`` neighbours).

    >>> mask_graph([2, 0, 1], degree=None, seed=b"s")
    {0: [1, 2], 1: [0, 2], 2: [0, 1]}
    >>> g = mask_graph(range(10), degree=3, seed=b"s")
    >>> sorted({len(peers) for peers in g.values()}), all(i in g[j] for i in g for j in g[i])
    ([4], True)
    """
    order = _check_sites(sites)
    if not isinstance(seed, (bytes, bytearray)) or not seed:
        raise ConfigError(f"mask_graph needs a non-empty bytes seed; got {seed!r}")
    n = len(order)
    if degree is not None and not _is_int(degree, low=1):
        raise ConfigError(f"the mask graph degree must be None (dense) or an integer >= 1; "
                          f"got {degree!r}")
    if degree is None or degree + degree % 2 >= n - 1:
        return {s: [t for t in order if t != s] for s in order}
    ring = _permute(order, seed=bytes(seed))
    half = (degree + degree % 2) // 2
    graph: dict[int, list[int]] = {s: [] for s in order}
    for pos, s in enumerate(ring):
        graph[s] = sorted(ring[(pos + off) % n] for off in range(-half, half + 1) if off)
    return graph


def pair_key(own: X25519PrivateKey, peer: X25519PublicKey, *, own_site: int,
             peer_site: int) -> bytes:
    """The 32-byte mask key two sites share: X25519, then HKDF-SHA256 bound to the pair.

    Symmetric: ``pair_key(a, B, own_site=i, peer_site=j) == pair_key(b, A, own_site=j,
    peer_site=i)``, since the HKDF info names the two sites in sorted order.
    """
    for name, value in (("own_site", own_site), ("peer_site", peer_site)):
        if not _is_int(value, low=0):
            raise UpdateError(f"pair_key needs a site index >= 0 for {name}; got {value!r}")
    if own_site == peer_site:
        raise UpdateError(f"pair_key needs two different sites; got {own_site} twice")
    try:
        shared = own.exchange(peer)
    except ValueError as exc:  # a low-order point: the peer's public key is not a real key
        raise KeyFileError(f"the public key of site {peer_site} gives no shared secret "
                           f"({exc}): a corrupt or malicious key") from None
    low, high = sorted((own_site, peer_site))
    info = f"fedsilo pairwise mask key: sites {low} and {high}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=PAIR_KEY_SALT,
                info=info).derive(shared)


def add_masks(vector: np.ndarray, *, site: int, pair_keys: Mapping[int, bytes], round_index: int,
              nonce: bytes) -> None:
    """Add ``site``'s pairwise masks to a quantized ``uint64`` vector, in place.

    For each peer ``j`` (sorted) the mask is the ChaCha20 keystream of ``pair_keys[j]`` with
    the 16-byte nonce ``counter 0 (4 bytes) | round_index (4 bytes LE) | nonce (8 bytes)``,
    read as little-endian uint64; it is added when ``site < j`` and subtracted otherwise,
    so over all sites every mask cancels modulo 2^64.
    """
    _check_mask_args(vector, site=site, pair_keys=pair_keys, round_index=round_index,
                     nonce=nonce)
    full_nonce = bytes(4) + round_index.to_bytes(4, "little") + bytes(nonce)
    buffer = np.empty(min(vector.size, CHUNK_VALUES), dtype="<u8")  # shared by all peers
    for peer in sorted(pair_keys):
        combine = np.add if site < peer else np.subtract
        for start, mask in _keystream(bytes(pair_keys[peer]), full_nonce, buffer=buffer,
                                      size=vector.size):
            part = vector[start:start + mask.size]
            combine(part, mask, out=part)  # uint64 op uint64: wraps modulo 2^64, no floats


def derive_pair_keys(own: X25519PrivateKey, *, site: int, neighbours: Sequence[int],
                     public_keys: Mapping[int, X25519PublicKey]) -> dict[int, bytes]:
    """The pair keys ``site`` needs for :func:`add_masks`: one per neighbour in the graph."""
    missing = [j for j in neighbours if j not in public_keys]
    if missing:
        raise KeyFileError(f"no public key for site(s) {missing}; the identity directory "
                           f"lists sites {sorted(public_keys)}")
    return {j: pair_key(own, public_keys[j], own_site=site, peer_site=j) for j in neighbours}


def _keystream(key: bytes, nonce: bytes, *, buffer: np.ndarray,
               size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, mask chunk)`` pairs covering ``size`` uint64 values of one ChaCha20 stream.

    Each chunk is written into ``buffer`` (little-endian uint64), valid until the next one.
    """
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    chunk = buffer.size
    zeros = memoryview(_zeros(8 * chunk))
    for start in range(0, size, chunk):
        view = buffer[:min(chunk, size - start)]
        encryptor.update_into(zeros[:8 * view.size], view.data.cast("B"))
        yield start, view


@functools.lru_cache(maxsize=2)
def _zeros(num_bytes: int) -> bytes:
    # the plaintext whose encryption is the keystream; immutable, so one copy serves all calls
    return bytes(num_bytes)


def _permute(order: list[int], *, seed: bytes) -> list[int]:
    """Fisher–Yates shuffle of ``order`` driven by a ChaCha20 stream keyed by ``seed``."""
    key = hashlib.sha256(_GRAPH_DOMAIN + seed).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    ring = list(order)
    for i in range(len(ring) - 1, 0, -1):
        bound = i + 1
        limit = 2 ** 64 - 2 ** 64 % bound  # rejection sampling: no modulo bias
        while True:
            draw = int.from_bytes(encryptor.update(bytes(8)), "little")
            if draw < limit:
                break
        j = draw % bound
        ring[i], ring[j] = ring[j], ring[i]
    return ring


def _check_mask_args(vector: np.ndarray, *, site: int, pair_keys: Mapping[int, bytes],
                     round_index: int, nonce: bytes) -> None:
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.ndim != 1 \
            or not vector.flags.c_contiguous or not vector.flags.writeable:
        raise UpdateError(f"add_masks needs a writable contiguous 1-D uint64 vector; got "
                          f"{_describe(vector)}")
    if vector.size > MAX_VALUES:
        raise UpdateError(f"add_masks can mask at most 2^35 values (ChaCha20's counter); got "
                          f"{vector.size}")
    if not _is_int(site, low=0):
        raise UpdateError(f"add_masks needs a site index >= 0; got {site!r}")
    if not _is_int(round_index, low=0, high=2 ** 32):
        raise UpdateError(f"round_index must be an integer in [0, 2^32); got {round_index!r}")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise UpdateError(f"the mask nonce must be {NONCE_BYTES} bytes; got {nonce!r}")
    for peer, key in pair_keys.items():
        if peer == site:
            raise UpdateError(f"site {site} cannot mask with itself")
        size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        if size != KEY_BYTES:  # the key itself is secret: never put it in a message
            raise UpdateError(f"the pair key of sites {site} and {peer} must be {KEY_BYTES} "
                              f"bytes; got {size}")


def _is_int(value: object, *, low: int, high: int | None = None) -> bool:
    """An ``int`` (not a bool) in ``[low, high)``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low \
        and (high is None or value < high)


def _check_sites(sites: Sequence[int]) -> list[int]:
    given = list(sites)
    if not given or not all(_is_int(int(s) if isinstance(s, np.integer) else s, low=0)
                            for s in given):
        raise ConfigError(f"the mask graph needs site indexes >= 0; got {given}")
    order = sorted(int(s) for s in given)
    if len(set(order)) != len(order):
        raise ConfigError(f"the mask graph needs distinct site indexes; got {given}")
    return order


def _check_frac_bits(frac_bits: int) -> None:
    if not _is_int(frac_bits, low=0, high=MAX_FRAC_BITS + 1):
        raise ConfigError(f"frac_bits must be an integer in [0, {MAX_FRAC_BITS}] "
                          f"(aggregation.frac_bits); got {frac_bits!r}")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return (f"{value.dtype} array of shape {value.shape}"
                f"{'' if value.flags.c_contiguous else ', not contiguous'}"
                f"{'' if value.flags.writeable else ', read-only'}")
    return type(value).__name__


class SiteIdentities:
    """A participant rank's identity material for masking: every site's public key (from
    ``public.json``), the private keys of its own ``sites``, and the pairwise keys derived
    from them on first use.  Refuses a list that misses a site of the federation."""

    def __init__(self, key_dir: str | Path, *, sites: Sequence[int], num_sites: int) -> None:
        from fedsilo.crypto.identity import PUBLIC_FILE, load_identity, load_public_keys
        key_dir = Path(key_dir)
        self.public_keys = load_public_keys(key_dir)
        missing = sorted(set(range(num_sites)) - set(self.public_keys))
        if missing:
            raise KeyFileError(f"{key_dir / PUBLIC_FILE} lists no identity key for site(s) "
                               f"{missing} of the shard set; issue keys for all {num_sites} "
                               f"sites with 'fedsilo keys --identity --sites {num_sites} "
                               f"--out DIR'")
        self.own = {site: load_identity(key_dir, site, public_keys=self.public_keys)
                    for site in sites}
        #: the sha256 of the public key list read: every rank must have read the same
        self.digest = hashlib.sha256((key_dir / PUBLIC_FILE).read_bytes()).hexdigest()
        self._pairs: dict[tuple[int, int], bytes] = {}

    def pair_key(self, site: int, peer: int) -> bytes:
        """The mask key of own ``site`` with ``peer`` (derived once, then kept)."""
        if (site, peer) not in self._pairs:
            self._pairs[site, peer] = pair_key(self.own[site], self.public_keys[peer],
                                               own_site=site, peer_site=peer)
        return self._pairs[site, peer]
