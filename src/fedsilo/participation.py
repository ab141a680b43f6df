"""Which sites train in a round, and which MPI rank runs which site (pure; no MPI, no torch).

Sites are placed on participant ranks in contiguous blocks, so that reading the ranks in
order and each rank's sites in order gives the sites in order:

>>> assign_sites(num_sites=5, num_ranks=2)
[[0, 1, 2], [3, 4]]
>>> rank_of_sites(num_sites=5, num_ranks=2)
{0: 1, 1: 1, 2: 1, 3: 2, 4: 2}

Partial participation samples ``max(min, ceil(fraction · n))`` of the ``n`` available sites
each round, uniformly without replacement, from a stream derived from (seed, round) alone:

>>> sample_sites([0, 1, 2, 3, 4, 5], fraction=0.5, minimum=1, seed=0, round_index=3)
[1, 2, 4]
>>> sample_sites([0, 1, 2], fraction=1.0, minimum=1, seed=0, round_index=3)
[0, 1, 2]
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fedsilo.errors import ConfigError
from fedsilo.seeds import seed_sequence

#: keeps the participation stream apart from every other (seed, round) stream
#: (the tags in use: fedsilo.seeds)
_STREAM = 0x5A4D_9E


def assign_sites(*, num_sites: int, num_ranks: int) -> list[list[int]]:
    """The sites of each participant rank (index 0 is MPI rank 1), contiguous blocks whose
    sizes differ by at most one."""
    if num_ranks < 1 or num_sites < num_ranks:
        raise ConfigError(f"cannot place {num_sites} sites on {num_ranks} participant ranks: "
                          f"every participant rank needs at least one site")
    return [block.tolist() for block in np.array_split(np.arange(num_sites), num_ranks)]


def rank_of_sites(*, num_sites: int, num_ranks: int) -> dict[int, int]:
    """Site index -> the MPI rank (1..R) that runs it."""
    return {site: rank + 1 for rank, sites in enumerate(assign_sites(num_sites=num_sites,
                                                                      num_ranks=num_ranks))
            for site in sites}


def sample_size(available: int, *, fraction: float, minimum: int) -> int:
    """How many of ``available`` sites a round samples."""
    return min(available, max(minimum, math.ceil(fraction * available - 1e-9)))


def sample_sites(available: Sequence[int], *, fraction: float, minimum: int, seed: int,
                 round_index: int) -> list[int]:
    """The sites that train in round ``round_index`` (sorted), a reproducible sample."""
    available = sorted(available)
    count = sample_size(len(available), fraction=fraction, minimum=minimum)
    if count >= len(available):
        return available
    rng = np.random.default_rng(seed_sequence(seed, round_index, _STREAM))
    chosen = rng.choice(len(available), size=count, replace=False)
    return sorted(available[i] for i in chosen)
