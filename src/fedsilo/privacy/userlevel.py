"""User-level (here: site-level) DP for FedAvg: DP-FedAvg (McMahan, Ramage, Talwar & Zhang,
"Learning Differentially Private Recurrent Language Models", ICLR 2018).

Each participant clips its model delta Δ_k to norm C before weighting it, so that one
site changes the weighted sum Σ_k w_k clip(Δ_k) by at most S = C · max_k w_k; Gaussian
noise of standard deviation σS is added to the sum — by the coordinator (``central``) or as
P independent shares of standard deviation σS/√P, one added by each participant before it
sends (``distributed``: the coordinator, and an encrypted sum, only ever see noised
updates).  Each round is one Gaussian mechanism with sampling rate = the participation
fraction, accounted with RDP over the rounds.  Pure numpy: no torch, no MPI.

>>> delta = np.array([3.0, 4.0], dtype=np.float32)
>>> clip_in_place(delta, clip_norm=1.0)
5.0
>>> delta.tolist()
[0.6000000238418579, 0.800000011920929]
>>> noise_std(noise_multiplier=2.0, clip_norm=1.0, weights={0: 0.25, 1: 0.75}, share=False)
1.5
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def clip_in_place(delta: np.ndarray, *, clip_norm: float) -> float:
    """Scale ``delta`` to L2 norm at most ``clip_norm``; returns its norm before clipping."""
    norm = float(np.linalg.norm(delta.astype(np.float64, copy=False)))
    if norm > clip_norm:
        delta *= np.float32(clip_norm / norm)
    return norm


def noise_std(*, noise_multiplier: float, clip_norm: float, weights: Mapping[int, float],
              share: bool) -> float:
    """Standard deviation of the noise on the weighted sum (``share``: of one participant's
    share of it, so that the P shares add up to the same variance)."""
    if not weights:
        return 0.0
    std = noise_multiplier * clip_norm * max(weights.values())
    return std / math.sqrt(len(weights)) if share else std


def add_noise(buffer: np.ndarray, *, std: float, seed: Sequence[int]) -> None:
    """Add N(0, std²) to every element of ``buffer`` in place, from a generator seeded by
    ``seed`` (so a resumed run draws the same noise)."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
    buffer += rng.standard_normal(buffer.shape, dtype=np.float32) * np.float32(std)
