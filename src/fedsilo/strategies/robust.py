"""Byzantine-robust aggregation: coordinate-wise median and trimmed mean (Yin, Chen,
Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018).

Both need every participant's update (``linear = False``): they cannot run on a sum, so
not under encryption either.  Both ignore the sample weights on purpose: a site that
claims many samples must not be able to outvote the others, which is the point of a
robust aggregator.  The server step is FedAvg's, ``w + η · aggregate``.

``trimmed_mean`` drops ``floor(trim · K)`` updates from each end of every coordinate; when
that is zero (few participants, e.g. ``K = 4`` with ``trim = 0.2``) it is the plain mean
and no longer robust.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fedsilo.aggregate import coordinate_median, trimmed_mean
from fedsilo.strategies.base import STRATEGIES, check_option, check_server_lr
from fedsilo.strategies.fedavg import FedAvg


def _check_weights(updates: np.ndarray, weights: Sequence[float] | np.ndarray) -> None:
    if len(weights) != len(updates):
        raise ValueError(f"need one weight per update, got {len(weights)} and {len(updates)}")


@STRATEGIES.register("median")
class Median(FedAvg):
    name = "median"
    linear = False

    def combine(self, updates: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        _check_weights(updates, weights)
        return coordinate_median(updates)


@STRATEGIES.register("trimmed_mean")
class TrimmedMean(FedAvg):
    name = "trimmed_mean"
    linear = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        trim: float = 0.1
        server_lr: float = 1.0

        def __post_init__(self) -> None:
            check_option(0 <= self.trim < 0.5, "trim",
                         f"must be in [0, 0.5) (the share dropped at each end), got {self.trim}")
            check_server_lr(self.server_lr)

    def combine(self, updates: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        _check_weights(updates, weights)
        return trimmed_mean(updates, self.options.trim)
