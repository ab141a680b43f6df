"""The codec registry and the identity codec (plain float32 on the wire)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fedsilo.registry import Registry

#: codec factories by name: ``CODECS.get(name)(**kwargs)``
CODECS: Registry[Callable[..., Any]] = Registry("codec")


@CODECS.register("identity")
class IdentityCodec:
    """No encryption: the 'ciphertext' is a float32 copy of the vector."""

    name = "identity"

    # The plain transport's wire format (Horovod's ``Compression.none``): the buffer itself.

    def compress(self, vector: np.ndarray) -> np.ndarray:
        """What goes on the wire for ``vector``: the vector itself, no copy."""
        return vector

    def decompress(self, wire: np.ndarray, *, out: np.ndarray) -> np.ndarray:
        """The received ``wire`` into ``out`` (the same buffer: nothing to do)."""
        if wire is not out:
            np.copyto(out, wire, casting="same_kind")
        return out

    def encrypt(self, vector: np.ndarray) -> np.ndarray:
        return np.array(vector, dtype=np.float32, copy=True)

    def to_bytes(self, ciphertext: np.ndarray) -> bytes:
        return ciphertext.tobytes()

    def from_bytes(self, data: bytes | memoryview) -> np.ndarray:
        return np.frombuffer(data, dtype=np.float32).copy()

    def add_into(self, total: np.ndarray, other: np.ndarray) -> np.ndarray:
        total += other
        return total

    def decrypt_into(self, ciphertext: np.ndarray, out: np.ndarray) -> np.ndarray:
        out[:] = ciphertext
        return out


@CODECS.register("ckks")
def _ckks(*, keys: Any, workers: int = 1) -> Any:
    from fedsilo.crypto.ckks import CKKSCodec  # TenSEAL is imported only when asked for

    return CKKSCodec(keys, workers=workers)
