"""Pairwise masks under CKKS: masked fixed-point integers carried in CKKS slots.

Under CKKS one participant decrypts whatever ciphertext it is handed.  A coordinator that
deviates could hand it a single site's ciphertext instead of the total and get that site's
update back: a decryption oracle.  So every site also adds its pairwise masks
(``crypto/masks.py``, the masks mode's X25519 key material) before encrypting, in a ring
``Z_M``, ``M = 2^ring_bits``:

    u_k = (round(x_k · 2^frac_bits) + Σ_j ±m_kj) mod M

and encodes ``u_k`` in CKKS as the real number ``u_k · 2^-slot_bits``.  The encrypted sum of
the P team ranks' ciphertexts decrypts to ``Σ u_k · 2^-slot_bits`` within CKKS's error bound
E(P) (``params.py``); ``slot_bits`` is chosen so that E(P) · 2^slot_bits ≤ 1/4, so rounding
gives the integer ``Σ u_k`` exactly, and reducing it mod M cancels every mask.  Any single
ciphertext, or any sum short of all planned sites, decrypts to values uniform in ``Z_M``
(the mask graph is connected): it reveals nothing, to anyone.

The CKKS headroom bounds the ring: a sum of P values below ``M · 2^-slot_bits`` each must
stay under ``max_abs``, so ``ring_bits = log2(max_abs) + slot_bits - ceil(log2 P)``.  Of those
bits, ``frac_bits`` are the fixed point's fraction (at most 32) and the rest leave room for
sums of magnitude up to :attr:`RingEncoding.value_bound` (at least 16).  Rounding is the only
error left: at most ``P · 2^-(frac_bits+1)`` per value of the sum; CKKS's own error is gone.

>>> from fedsilo.crypto.params import CKKSParams
>>> enc = ring_encoding(CKKSParams(), num_terms=3)
>>> enc.ring_bits, enc.frac_bits, enc.slot_bits, enc.value_bound
(38, 32, 32, 32.0)
>>> values = np.array([0.5, -1.25, 3e-9])
>>> ring = to_ring(values, enc)
>>> slots = ring_to_slots(ring, enc)
>>> float(slots.max()) < 2.0 ** (enc.ring_bits - enc.slot_bits)
True
>>> back = ring_to_float(slots_to_ring(slots + 1e-3 * 2.0 ** -enc.slot_bits, enc), enc,
...                      out=np.empty(3))
>>> bool(np.abs(back - values).max() <= 2.0 ** -(enc.frac_bits + 1))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsilo.crypto.masks import check_headroom, quantize
from fedsilo.crypto.params import CKKSParams
from fedsilo.errors import KeyFileError, UpdateError

#: fraction bits of the fixed point, at most (masks mode's default)
MAX_FRAC_BITS = 32
#: the fewest fraction bits accepted: coarser would lose the updates' precision
MIN_FRAC_BITS = 16
#: bits of headroom above the fraction: sums up to 2^4 = 16 in magnitude (REQUIRED_MAX_ABS)
VALUE_BITS = 4


@dataclass(frozen=True)
class RingEncoding:
    """The ring ``Z_(2^ring_bits)``, the fixed point in it, and the CKKS encoding scale."""

    ring_bits: int
    frac_bits: int
    slot_bits: int

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.ring_bits) - 1)

    @property
    def value_bound(self) -> float:
        """Every weighted update, and the sum, must stay below this in magnitude."""
        return 2.0 ** (self.ring_bits - 1 - self.frac_bits)

    def max_error(self, num_terms: int) -> float:
        """Bound on the error of one value of a sum of ``num_terms`` terms (rounding only)."""
        return num_terms * 2.0 ** -(self.frac_bits + 1)


def ring_encoding(params: CKKSParams, *, num_terms: int) -> RingEncoding:
    """The encoding for a sum of ``num_terms`` ciphertexts under ``params`` (see the module
    docstring); a :class:`KeyFileError` when the parameters leave too few bits for that many."""
    if num_terms < 1:
        raise KeyFileError(f"a sum needs at least one term; got {num_terms}")
    slot_bits = math.floor(math.log2(0.25 / params.error_bound(num_terms)))
    headroom_bits = params.data_bits - 2 - params.scale_bits  # log2(max_abs)
    ring_bits = min(62, headroom_bits + slot_bits - (num_terms - 1).bit_length())
    frac_bits = min(MAX_FRAC_BITS, ring_bits - 1 - VALUE_BITS)
    if frac_bits < MIN_FRAC_BITS:
        raise KeyFileError(
            f"CKKS parameters {params.to_dict()} leave {frac_bits} fixed-point fraction bits "
            f"for a masked sum of {num_terms} ciphertexts (at least {MIN_FRAC_BITS} needed); "
            f"create keys with a larger poly_modulus_degree and data_bits, or use "
            f"aggregation.secure=masks")
    return RingEncoding(ring_bits=ring_bits, frac_bits=frac_bits, slot_bits=slot_bits)


def to_ring(values: np.ndarray, enc: RingEncoding, *, num_terms: int = 1,
            out: np.ndarray | None = None) -> np.ndarray:
    """Fixed point of ``values`` as uint64 (mod 2^64: reducing mod M later is exact), after
    checking that a sum of ``num_terms`` such vectors stays within the ring."""
    peak = float(np.abs(values).max()) if values.size else 0.0
    if not math.isfinite(peak):
        raise UpdateError("an update contains non-finite values; it cannot be encrypted")
    if peak * num_terms >= enc.value_bound:
        raise UpdateError(
            f"an update value of magnitude {peak:.4g} is too large for masked CKKS "
            f"aggregation of {num_terms} terms: every |value| must stay under "
            f"{enc.value_bound / num_terms:.4g}; lower train.lr")
    check_headroom(peak, frac_bits=enc.frac_bits, num_terms=num_terms)
    return quantize(values, frac_bits=enc.frac_bits, out=out)


def ring_to_slots(ring: np.ndarray, enc: RingEncoding, *,
                  out: np.ndarray | None = None) -> np.ndarray:
    """What is encrypted: each masked ring element reduced mod M, times 2^-slot_bits
    (exact in float64: M < 2^53)."""
    if out is None:
        out = np.empty(ring.size, dtype=np.float64)
    np.bitwise_and(ring, enc.modulus_mask, out=ring)
    np.multiply(ring, 2.0 ** -enc.slot_bits, out=out, casting="unsafe")
    return out


def slots_to_ring(values: np.ndarray, enc: RingEncoding) -> np.ndarray:
    """The decrypted sum back to the ring: ``round(values · 2^slot_bits) mod M``."""
    scaled = np.rint(values * 2.0 ** enc.slot_bits)
    ring = scaled.astype(np.int64).view(np.uint64)
    np.bitwise_and(ring, enc.modulus_mask, out=ring)
    return ring


def ring_to_float(ring: np.ndarray, enc: RingEncoding, *, out: np.ndarray) -> np.ndarray:
    """The signed fixed-point value of each ring element (mod M), as floats into ``out``."""
    signed = ring.astype(np.int64)
    half = np.int64(1 << (enc.ring_bits - 1))
    signed[signed >= half] -= np.int64(1 << enc.ring_bits)
    np.multiply(signed, 2.0 ** -enc.frac_bits, out=out, casting="same_kind")
    return out
