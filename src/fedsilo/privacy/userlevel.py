"""User-level (here: site-level) DP for FedAvg: DP-FedAvg (McMahan, Ramage, Talwar & Zhang,
"Learning Differentially Private Recurrent Language Models", ICLR 2018).

Each participant clips its model delta Δ_k to norm C before weighting it.  The weights are
fixed for the job, w_k = n_k / Σn over every site of the federation (not renormalized over a
round's sample or its contributors), so adding or removing one site's whole contribution
changes the released sum Σ_k w_k clip(Δ_k) by at most S = C · max_k w_k.  Gaussian noise of
standard deviation σS is added to that sum *before* anything rescales it — by the
coordinator (``central``) or as m independent shares of standard deviation σS/√m, one from
each of the round's m planned sites, whether or not it contributes an update
(``distributed``).  Each round is one Gaussian mechanism of noise multiplier σ on each site
that was planned; no amplification by sampling is claimed (the sample is known to the
coordinator and listed in ``metrics.jsonl``).  Pure numpy: no torch, no MPI.

>>> delta = np.array([3.0, 4.0], dtype=np.float32)
>>> clip_in_place(delta, clip_norm=1.0)
5.0
>>> delta.tolist()
[0.6000000238418579, 0.800000011920929]
>>> noise_std(noise_multiplier=2.0, clip_norm=1.0, weights={0: 0.25, 1: 0.75})
1.5
>>> noise_std(noise_multiplier=2.0, clip_norm=1.0, weights={0: 0.25, 1: 0.75}, num_shares=4)
0.75
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def clip_in_place(delta: np.ndarray, *, clip_norm: float) -> float:
    """Scale ``delta`` to L2 norm at most ``clip_norm``; returns its norm before clipping."""
    norm = float(np.linalg.norm(delta.astype(np.float64, copy=False)))
    if norm > clip_norm:
        delta *= np.float32(clip_norm / norm)
    return norm


def noise_std(*, noise_multiplier: float, clip_norm: float, weights: Mapping[int, float],
              num_shares: int = 1) -> float:
    """Standard deviation of the noise on the weighted sum, σ·C·max_k w_k (``weights``: the
    fixed weights of every site), or of one of ``num_shares`` shares that add up to it."""
    if not weights:
        return 0.0
    if num_shares < 1:
        raise ValueError(f"num_shares must be >= 1, got {num_shares}")
    return noise_multiplier * clip_norm * max(weights.values()) / math.sqrt(num_shares)
