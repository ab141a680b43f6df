"""FedAvg (McMahan et al., AISTATS 2017), with an optional server learning rate.

With ``server_lr = 1`` the new global model is exactly the sample-weighted average of the
participants' models: ``w + Σ_k p_k (w_k − w)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedsilo.aggregate import add_scaled
from fedsilo.strategies.base import STRATEGIES, Strategy, check_server_lr


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    name = "fedavg"

    @dataclasses.dataclass(frozen=True)
    class Options:
        server_lr: float = 1.0

        def __post_init__(self) -> None:
            check_server_lr(self.server_lr)

    def server_step(self, weights: np.ndarray, aggregate: np.ndarray, *,
                    out: np.ndarray | None = None, fraction: float = 1.0) -> np.ndarray:
        return add_scaled(weights, aggregate, scale=self.options.server_lr, out=out)
