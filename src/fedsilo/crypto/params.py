"""CKKS parameters for encrypted *aggregation*: security bounds and the precision guarantee.

Pure maths (no TenSEAL): which parameters are safe, and how precise a sum of ``P`` fresh
ciphertexts is.  CKKS is from Cheon, Kim, Kim & Song, "Homomorphic Encryption for
Arithmetic of Approximate Numbers" (ASIACRYPT 2017); the security bounds are Table 1 of the
Homomorphic Encryption Security Standard (Albrecht et al., homomorphicencryption.org, 2018),
128-bit classical security, ternary secret, error σ = 3.2.

Aggregation only *adds* ciphertexts, so no multiplication, rescaling or relinearisation is
ever needed: the modulus chain is a single data prime ``q`` (plus the special prime SEAL
reserves for key switching, which no ciphertext carries).  fedsilo packs two values per
slot (real and imaginary parts: N values per ciphertext) and sends fresh ciphertexts
seeded (SEAL's symmetric encryption: one polynomial and the seed of the other), so a
fresh ciphertext is N coefficients of ``data_bits`` bits for N values: data_bits/8 bytes
per value before zstd (7 B at 56 bits; 7.6 B measured), and a sum of them (two
polynomials) 2·data_bits/8 (NVIDIA FLARE's default chain [60, 40, 40], one value per
slot, costs about 57 B).

Precision guarantee (documented in docs/he.md and tested): with scale Δ = 2^scale_bits,
each decrypted slot of a sum of ``P`` ciphertexts differs from the exact sum by at most

    E(P) = 7 · sqrt(P · N · (σ² + 1/12)) / Δ

(each ciphertext adds independent Gaussian encryption noise of variance N·σ² per slot and
encoding round-off of variance N/12; 7 standard deviations bound a slot except with
probability ~1e-12), as long as no partial sum exceeds ``max_abs = 2^(data_bits-2) / Δ`` in
magnitude (beyond that the value wraps modulo q and decrypts to garbage).

>>> p = CKKSParams()
>>> p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits, p.max_abs
(8192, [56, 56], 46, 256.0)
>>> round(p.error_bound(16) * 1e10, 2)
1.16
>>> validate(CKKSParams(poly_modulus_degree=4096, data_bits=60), num_participants=4)
Traceback (most recent call last):
...
fedsilo.errors.KeyFileError: insecure CKKS parameters: poly_modulus_degree 4096 allows at most 109 bits of coefficient modulus for 128-bit security (HE standard 2018), but [60, 60] has 120; lower data_bits to 54 or raise poly_modulus_degree
"""  # noqa: E501

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from fedsilo.errors import KeyFileError

#: HE standard (2018), Table 1: max log2(q) for 128-bit classical security (ternary secret)
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: SEAL's limits on one prime
MIN_PRIME_BITS, MAX_PRIME_BITS = 20, 60
#: encryption error standard deviation (SEAL's default)
SIGMA = 3.2
#: the precision every accepted parameter set must deliver for its number of participants:
#: absolute error per aggregated value (float32 resolves a typical update of 1e-2 to ~1e-9)
REQUIRED_ERROR = 1e-9
#: the least headroom accepted: every update and partial sum must stay below this in magnitude
REQUIRED_MAX_ABS = 16.0


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters for aggregation: ring degree, one data prime, scale."""

    poly_modulus_degree: int = 8192
    #: bits of the one data prime q (the special prime gets the same size)
    data_bits: int = 56
    #: log2 of the encoding scale Δ
    scale_bits: int = 46

    @property
    def coeff_mod_bit_sizes(self) -> list[int]:
        return [self.data_bits, self.data_bits]

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def max_abs(self) -> float:
        """Largest |value| (any update, any partial sum) that decrypts correctly."""
        return 2.0 ** (self.data_bits - 2 - self.scale_bits)

    def error_bound(self, num_participants: int) -> float:
        """E(P): bound on the absolute error of one value of a sum of P ciphertexts."""
        n = self.poly_modulus_degree
        return (7.0 * math.sqrt(num_participants * n * (SIGMA ** 2 + 1 / 12))
                / 2.0 ** self.scale_bits)

    def max_participants(self) -> int:
        """Most participants for which E(P) <= REQUIRED_ERROR."""
        per_one = self.error_bound(1)
        return int((REQUIRED_ERROR / per_one) ** 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CKKSParams":
        known = {"poly_modulus_degree", "data_bits", "scale_bits"}
        if set(data) - known or not all(isinstance(data.get(k), int) for k in known):
            raise KeyFileError(f"CKKS parameters must be integers {sorted(known)}; "
                               f"got {dict(data)}")
        return cls(**{k: data[k] for k in known})


def validate(params: CKKSParams, *, num_participants: int) -> CKKSParams:
    """Refuse parameters that are insecure, or too imprecise for ``num_participants``."""
    n = params.poly_modulus_degree
    if n not in MAX_COEFF_BITS_128:
        raise KeyFileError(f"poly_modulus_degree must be one of "
                           f"{', '.join(map(str, MAX_COEFF_BITS_128))}; got {n}")
    if not MIN_PRIME_BITS <= params.data_bits <= MAX_PRIME_BITS:
        raise KeyFileError(f"data_bits must be in [{MIN_PRIME_BITS}, {MAX_PRIME_BITS}] (SEAL's "
                           f"limits on one prime); got {params.data_bits}")
    total, bound = sum(params.coeff_mod_bit_sizes), MAX_COEFF_BITS_128[n]
    if total > bound:
        raise KeyFileError(
            f"insecure CKKS parameters: poly_modulus_degree {n} allows at most {bound} bits of "
            f"coefficient modulus for 128-bit security (HE standard 2018), but "
            f"{params.coeff_mod_bit_sizes} has {total}; lower data_bits to "
            f"{min(bound // 2, MAX_PRIME_BITS)} or raise poly_modulus_degree")
    if params.max_abs < REQUIRED_MAX_ABS:
        raise KeyFileError(
            f"imprecise CKKS parameters: scale_bits {params.scale_bits} leaves values up to "
            f"{params.max_abs:g} only (data_bits - 2 - scale_bits must give >= "
            f"{REQUIRED_MAX_ABS:g}); lower scale_bits to at most "
            f"{params.data_bits - 2 - int(math.log2(REQUIRED_MAX_ABS))}")
    if num_participants < 1:
        raise KeyFileError(f"the number of participants must be >= 1; got {num_participants}")
    error = params.error_bound(num_participants)
    if error > REQUIRED_ERROR:
        raise KeyFileError(
            f"imprecise CKKS parameters for {num_participants} participants: the error bound "
            f"of the encrypted sum is {error:.3g} per value, more than the required "
            f"{REQUIRED_ERROR:g}; raise scale_bits (these parameters allow at most "
            f"{params.max_participants()} participants)")
    return params


def key_mismatch(summaries: Sequence[Mapping[str, Any] | None]) -> str | None:
    """Given every rank's key summary (rank 0 the coordinator's), say what does not match.

    Every rank calls this on the same gathered list, so every rank reaches the same verdict.
    """
    missing = [rank for rank, s in enumerate(summaries) if s is None]
    if missing:
        return f"ranks {missing} hold no encryption key (he.keys)"
    coordinator = summaries[0]
    participants = [(rank, s) for rank, s in enumerate(summaries) if rank and s is not None]
    assert coordinator is not None
    fingerprints = {s["fingerprint"] for _, s in participants}
    if len(fingerprints) > 1:
        groups: dict[str, list[int]] = {}
        for rank, s in participants:
            groups.setdefault(s["fingerprint"], []).append(rank)
        listing = "; ".join(f"ranks {ranks} hold key {fp[:12]}" for fp, ranks in groups.items())
        return (f"participants hold different encryption keys ({listing}); give every "
                f"participant the same participant.key from one 'fedsilo keys' run")
    first = participants[0][1]
    if coordinator["params"] != first["params"]:
        return (f"the coordinator's context has CKKS parameters {coordinator['params']}, the "
                f"participants' key {first['params']}; they must come from one 'fedsilo keys' run")
    if coordinator["key_id"] != first["key_id"]:
        return (f"the coordinator's context (key id {coordinator['key_id'][:12]}) does not belong "
                f"to the participants' key (key id {first['key_id'][:12]}); use the "
                f"coordinator.ctx written together with their participant.key")
    return None
