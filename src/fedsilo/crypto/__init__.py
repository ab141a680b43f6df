"""Encrypted aggregation: codecs that turn an update into something the transport can add.

Following Horovod's compressors, a codec has one shape whatever it does: ``encrypt``
(compress) a float32 vector, ``to_bytes``/``from_bytes`` for the wire, ``add_into`` for the
reduction, ``decrypt_into`` (decompress) a float32 buffer.  ``identity`` is plain float32;
``ckks`` (TenSEAL, in :mod:`fedsilo.crypto.ckks`, the only module importing it) is
homomorphic encryption.  Pure parameter maths is in :mod:`fedsilo.crypto.params`.
"""

from fedsilo.crypto.codec import CODECS, IdentityCodec

__all__ = ["CODECS", "IdentityCodec"]
