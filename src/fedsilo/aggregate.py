"""Aggregation maths: numpy in, numpy out, no transport (as Flower's ``strategy/aggregate.py``).

FedAvg is from McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017): the new global model is the sample-weighted average of
the participants' models, i.e. ``w + Σ_k (n_k / Σn) (w_k − w)``.

Participants pre-weight their update by ``n_k / Σn`` before sending it, so that the
transport (an MPI ``Reduce``, or an encrypted sum) only has to *add* vectors.

>>> fedavg_weights({1: 30, 2: 10})
{1: 0.75, 2: 0.25}
>>> weighted_sum([np.array([1.0, 2.0]), np.array([3.0, 6.0])], [0.75, 0.25]).tolist()
[1.5, 3.0]
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fedsilo.errors import UpdateError


def fedavg_weights(num_samples: Mapping[int, int]) -> dict[int, float]:
    """Weights ``n_k / Σ n`` for the participants of a round (keys are participant ids)."""
    total = sum(num_samples.values())
    if total <= 0:
        raise UpdateError(f"cannot weight a round with no samples: {dict(num_samples)}")
    return {k: n / total for k, n in num_samples.items()}


def weighted_sum(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``Σ_k weights[k] · updates[k]`` in float64, returned as float32."""
    if len(updates) != len(weights) or not updates:
        raise ValueError(f"need as many weights as updates, got {len(weights)} and {len(updates)}")
    total = np.zeros(updates[0].shape, dtype=np.float64)
    for update, weight in zip(updates, weights):
        total += weight * update.astype(np.float64, copy=False)
    return total.astype(np.float32)


def count_nonfinite(vector: np.ndarray) -> int:
    """How many entries are NaN or ±Inf (cheap check before an update leaves a rank)."""
    # A finite sum proves every element finite; an infinite one (NaN/Inf, or a float32
    # overflow of finite values) falls through to the exact count.  float32 is 4x faster.
    if np.isfinite(vector.sum(dtype=np.float32)):
        return 0
    return int(vector.size - np.count_nonzero(np.isfinite(vector)))
