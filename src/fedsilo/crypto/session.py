"""Randomness the secure modes rest on, drawn jointly by the participants: commit, then reveal.

The mask nonce and the sparse mask graph decide which keystreams a site adds and who its
neighbours are.  Chosen by one party, they can be repeated (a reused keystream reveals the
difference of two updates) or ground until a target's neighbours are all in a coalition.
So no single party chooses them: at the start of every launch each participant draws 32
fresh bytes from the OS CSPRNG and the participants run a commit-then-reveal among
themselves, on a communicator the coordinator is not part of (Blum, "Coin flipping by
telephone", 1983):

1. each participant ``i`` publishes ``H(domain | i | r_i)`` (an allgather of commitments);
2. once every commitment is in, each reveals ``r_i`` (a second allgather), and everyone
   checks every reveal against its commitment;
3. the session seed is ``H(domain | r_1 | ... | r_P)``.

A party that sees the others' reveals has already committed to its own, so it cannot steer
the seed; a participant's own fresh ``r_i`` is in every seed it uses, so no launch repeats
its masks whatever the others do.  The coordinator takes no part and learns the seed only
if a participant tells it (it need not: it only receives sums).

>>> mine = [bytes([k]) * SEED_BYTES for k in (1, 2, 3)]
>>> commits = [commitment(r, index=k) for k, r in enumerate(mine)]
>>> seed = joint_seed(commits, mine, own_index=1, own=mine[1])
>>> len(seed), len(mask_nonce(seed))
(32, 8)
>>> mine[2] = bytes(SEED_BYTES)  # participant 3 reveals something else than it committed to
>>> joint_seed(commits, mine, own_index=1, own=mine[1])
Traceback (most recent call last):
...
fedsilo.errors.PolicyError: the session's joint randomness: participant rank(s) [3] revealed ...
>>> graph_seed(seed, 3) != graph_seed(seed, 4)
True
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Sequence

from fedsilo.errors import PolicyError

#: bytes each participant contributes, and of the session seed
SEED_BYTES = 32
_COMMIT = b"fedsilo-session-commit-v1"
_SEED = b"fedsilo-session-seed-v1"
_NONCE = b"fedsilo-mask-nonce-v1"
_GRAPH = b"fedsilo-mask-graph-seed-v1"


def new_contribution() -> bytes:
    """A participant's fresh share of the session's randomness (OS CSPRNG)."""
    return secrets.token_bytes(SEED_BYTES)


def commitment(contribution: bytes, *, index: int) -> bytes:
    """The hiding, binding commitment to ``contribution`` of the participant at ``index``."""
    return hashlib.sha256(_COMMIT + index.to_bytes(4, "little") + bytes(contribution)).digest()


def joint_seed(commitments: Sequence[bytes], reveals: Sequence[bytes], *, own_index: int,
               own: bytes) -> bytes:
    """The session seed from every participant's commitment and reveal (in participant
    order); a :class:`PolicyError` naming the participants whose reveal does not open their
    commitment, or when this participant's own contribution is not the one listed."""
    if len(commitments) != len(reveals) or not 0 <= own_index < len(reveals):
        raise PolicyError(f"the session's joint randomness: {len(commitments)} commitments "
                          f"and {len(reveals)} reveals for participant {own_index + 1}")
    bad = [k + 1 for k, (c, r) in enumerate(zip(commitments, reveals))
           if not isinstance(r, bytes) or len(r) != SEED_BYTES or commitment(r, index=k) != c]
    if bad:
        raise PolicyError(f"the session's joint randomness: participant rank(s) {bad} revealed "
                          f"a value that does not open their commitment (a party tried to "
                          f"choose the mask nonce or graph after seeing the others')")
    if reveals[own_index] != own:
        raise PolicyError("the session's joint randomness: this participant's own "
                          "contribution was replaced on the way")
    return hashlib.sha256(_SEED + b"".join(reveals)).digest()


def mask_nonce(seed: bytes) -> bytes:
    """The 8-byte mask nonce of a session (``crypto.masks.add_masks``)."""
    return hashlib.sha256(_NONCE + seed).digest()[:8]


def graph_seed(seed: bytes, round_index: int) -> bytes:
    """The seed of round ``round_index``'s sparse mask graph (``crypto.masks.mask_graph``)."""
    return hashlib.sha256(_GRAPH + seed + round_index.to_bytes(8, "little")).digest()


def digest(seed: bytes) -> str:
    """A public fingerprint of a session seed (the participants compare it each round)."""
    return hashlib.sha256(b"fingerprint" + seed).hexdigest()[:16]
