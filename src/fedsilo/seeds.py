"""Seeds derived from the user's seed: one helper for every purpose (pure; numpy only).

Every random choice of a run (local shuffling, participation samples, test and validation
hold-outs) draws from a stream named by the user's ``seed`` and a few integer *tags*.
NumPy's :class:`~numpy.random.SeedSequence` hashes the tags, so streams with different tags
are independent, and a stream depends on nothing else (not on rank placement, not on the
order in which other streams were drawn).

The tags in use, which a new stream must not repeat:

=========================================  ==============================================
``(round_index, site)``                    local training of a site in a round
                                           (:func:`fedsilo.training.round_seed`, 63 bits)
``(round_index, 0x5A4D9E)``                participation sample of a round
                                           (:func:`fedsilo.participation.sample_sites`)
``(1,)``, ``(1, k)``                       test hold-out, global or of site k (``fedsilo
                                           prep``; ``TEST_STREAM`` in fedsilo.prep.plan)
``(2,)``, ``(2, k)``                       validation hold-out of site k (``VAL_STREAM``)
=========================================  ==============================================

The prep tags overlap the training ones (``(1, k)`` is also round 1 of site k, at another
width).  That is harmless, since one picks a hold-out and the other orders a site's batches,
and changing either would change recorded shards or runs, so both stay as they are.

>>> derive_seed(0, 1)
3964924996
>>> derive_seed(0, 1, 0, bits=63)
2918264622725855778
>>> a, b = np.random.default_rng(seed_sequence(0, 3, 7)), np.random.default_rng([0, 3, 7])
>>> a.random() == b.random()
True
"""

from __future__ import annotations

import numpy as np


def seed_sequence(seed: int, *tags: int) -> np.random.SeedSequence:
    """The stream of ``seed`` for the purpose named by ``tags`` (give it to
    :func:`numpy.random.default_rng`; ``default_rng([seed, *tags])`` is the same stream).

    >>> seed_sequence(5, 1, 2).entropy
    [5, 1, 2]
    """
    return np.random.SeedSequence([int(seed), *(int(tag) for tag in tags)])


def derive_seed(seed: int, *tags: int, bits: int = 32) -> int:
    """An integer seed in ``[0, 2**bits)`` for the purpose named by ``tags``.

    The top ``bits`` bits of the stream's first 32-bit word (``bits <= 32``) or first 64-bit
    word (``32 < bits <= 64``).  Use 32 for numpy seeds, 63 for torch's (a signed int64).

    >>> derive_seed(7, 3, 2, bits=63) < 2**63, derive_seed(7, 3, 2) < 2**32
    (True, True)
    >>> derive_seed(0, bits=65)
    Traceback (most recent call last):
    ...
    ValueError: bits must be in [1, 64], got 65
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits!r}")
    dtype, width = (np.uint32, 32) if bits <= 32 else (np.uint64, 64)
    word = seed_sequence(seed, *tags).generate_state(1, dtype)[0]
    return int(word) >> (width - bits)
