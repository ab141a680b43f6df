"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335,
2019).

With ``Δ`` the weighted mean update, the server keeps a velocity ``v`` (zero at first)::

    v ← β v + Δ
    w ← w + η v

``β = 0, η = 1`` is FedAvg.  The default ``β = 0.9`` is a common choice; Hsu et al. find
that what matters is the effective learning rate ``η / (1 − β)``, so lower ``η`` as ``β``
grows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedsilo.aggregate import momentum_step
from fedsilo.strategies.base import STRATEGIES, Strategy, check_server_lr, check_unit_interval


@STRATEGIES.register("fedavgm")
class FedAvgM(Strategy):
    name = "fedavgm"
    state_names = ("velocity",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        server_lr: float = 1.0
        momentum: float = 0.9

        def __post_init__(self) -> None:
            check_server_lr(self.server_lr)
            check_unit_interval("momentum", self.momentum)

    def initial_state(self, num_params: int) -> dict[str, np.ndarray]:
        return {"velocity": np.zeros(num_params, dtype=np.float32)}

    def server_step(self, weights: np.ndarray, aggregate: np.ndarray, *,
                    out: np.ndarray | None = None, fraction: float = 1.0) -> np.ndarray:
        state = self._require_setup(weights)
        return momentum_step(weights, aggregate, state["velocity"], lr=self.options.server_lr,
                             momentum=self.options.momentum, out=out)
