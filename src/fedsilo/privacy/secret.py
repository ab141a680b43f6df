"""Secret randomness for privacy mechanisms: a per-site secret and a ChaCha20 stream.

Every random draw a differential-privacy mechanism relies on (Poisson sampling masks, the
Gaussian noise of DP-SGD, user-level noise and its shares) must be unpredictable to every
other party.  Deriving it from ``config.seed`` (public: it is in ``config.yaml``) lets anyone
who holds the run directory regenerate the noise and strip it from an update.  So here:

- a **secret** of 256 bits is drawn from the operating system's CSPRNG
  (:func:`secrets.token_bytes`) when a site first starts, kept only in that site's own
  checkpoint (mode 0600), never logged, never sent;
- each draw is the keystream of **ChaCha20** (RFC 7539, from the ``cryptography`` package)
  keyed by the secret, with a nonce made of (purpose, round, step): a pure function of the
  secret and public counters, so a resumed run that restores the secret draws exactly the
  same numbers, and no two (purpose, round, step) share a stream;
- Gaussian samples are Box–Muller transforms of 53-bit uniforms computed in float64 and
  released as float32 (the parameters' precision).  Each float32 noise value is thus the
  rounding of a float64 sample whose grid is 2^29 times finer, so every float32 value in the
  bulk is reachable: the floating-point attacks on Gaussian samplers (Mironov 2012; Jin et
  al. 2022), which look for outputs the sampler cannot produce, find none.  (Opacus's
  ``secure_mode`` sums four float32 samples instead, for the same reason; summing four
  float64 samples here measured 4× slower for no further gain.)

Pure numpy + ``cryptography``; no torch, no MPI.

>>> secret = bytes(32)  # a fixed secret for the example only; real ones come from new_secret()
>>> a = SecretStream(secret, purpose=Purpose.NOISE, round_index=3, step=0)
>>> b = SecretStream(secret, purpose=Purpose.NOISE, round_index=3, step=0)
>>> bool((a.gaussian(5) == b.gaussian(5)).all())  # same secret and counters: same draw
True
>>> c = SecretStream(secret, purpose=Purpose.NOISE, round_index=3, step=1)
>>> bool((a.gaussian(5) == c.gaussian(5)).any())  # another step: another stream
False
>>> SecretStream(secret, purpose=Purpose.POISSON, round_index=1, step=0).bernoulli(8, 0.0).any()
np.False_
"""

from __future__ import annotations

import enum
import math
import secrets
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

#: bytes of a site secret (256 bits: ChaCha20's key size)
SECRET_BYTES = 32
#: values generated per chunk, to bound the temporary memory of big models
_CHUNK = 1 << 20
_TWO_PI = 2.0 * math.pi


class Purpose(enum.IntEnum):
    """What a stream is for: each gets its own nonce space under the same secret."""

    POISSON = 1  #: DP-SGD's Poisson sampling mask of one step
    NOISE = 2  #: DP-SGD's Gaussian noise of one step
    USER_NOISE = 3  #: user-level DP noise (central) or a site's noise share (distributed)
    VALIDATION = 4  #: the noise of a site's validation histogram (dp.validation)


def new_secret() -> bytes:
    """A fresh secret from the operating system's CSPRNG."""
    return secrets.token_bytes(SECRET_BYTES)


def check_secret(secret: bytes) -> bytes:
    """``secret`` if it has the right type and length, else ValueError."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        got = len(secret) if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
        raise ValueError(f"a privacy secret is {SECRET_BYTES} bytes, got {got}")
    return bytes(secret)


class SecretStream:
    """The ChaCha20 keystream of one (purpose, round, step) under a site's secret, read as
    uniform integers, Bernoulli masks or Gaussian values; reads continue the stream."""

    def __init__(self, secret: bytes, *, purpose: Purpose, round_index: int, step: int) -> None:
        if not (0 <= round_index < 2**32 and 0 <= step < 2**32):
            raise ValueError(f"round {round_index} or step {step} out of range")
        # RFC 7539 layout: a 4-byte block counter (from 0), then the 12-byte nonce
        nonce = struct.pack("<IIII", 0, int(purpose), round_index, step)
        cipher = Cipher(algorithms.ChaCha20(check_secret(secret), nonce), mode=None)
        self._encryptor = cipher.encryptor()
        self._zeros = np.zeros(0, dtype=np.uint8)

    def uint64(self, count: int) -> np.ndarray:
        """``count`` independent uniform 64-bit integers."""
        nbytes = 8 * count
        if self._zeros.size < nbytes:
            self._zeros = np.zeros(nbytes, dtype=np.uint8)
        out = np.empty(nbytes, dtype=np.uint8)
        self._encryptor.update_into(self._zeros[:nbytes].data, out.data)
        return out.view("<u8")

    def bernoulli(self, count: int, probability: float) -> np.ndarray:
        """``count`` independent booleans, each True with ``probability`` (to 2⁻⁶⁴)."""
        if probability >= 1.0:
            self.uint64(count)  # keep the stream's position independent of q
            return np.ones(count, dtype=bool)
        threshold = np.uint64(int(probability * 2.0**64))
        return self.uint64(count) < threshold

    def gaussian(self, count: int) -> np.ndarray:
        """``count`` independent N(0, 1) values in float64 (Box–Muller, two words each)."""
        out = np.empty(count, dtype=np.float64)
        for begin in range(0, count, _CHUNK):
            n = min(_CHUNK, count - begin)
            out[begin: begin + n] = self._normal(n)
        return out

    def fill_gaussian(self, out: np.ndarray, *, std: float) -> None:
        """Overwrite ``out`` (float32, contiguous) with N(0, std²) values, chunk by chunk."""
        flat = out.reshape(-1)
        for begin in range(0, flat.size, _CHUNK):
            n = min(_CHUNK, flat.size - begin)
            flat[begin: begin + n] = self._normal(n) * std

    def _normal(self, n: int) -> np.ndarray:
        # value i takes the 64-bit words 2i and 2i+1 (one Box-Muller draw), so a read's
        # values never depend on how the stream is split into reads
        bits = self.uint64(2 * n).reshape(n, 2) >> np.uint64(11)
        u1 = (bits[:, 0] + np.uint64(1)).astype(np.float64) * 2.0**-53  # (0, 1]: log-safe
        u2 = bits[:, 1].astype(np.float64) * 2.0**-53
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(_TWO_PI * u2)
