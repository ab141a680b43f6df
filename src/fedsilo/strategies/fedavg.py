"""FedAvg (McMahan et al., AISTATS 2017), with an optional server learning rate.

With ``server_lr = 1`` the new global model is exactly the sample-weighted average of the
participants' models.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from fedsilo.aggregate import fedavg_weights
from fedsilo.errors import ConfigError
from fedsilo.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    name = "fedavg"

    @dataclasses.dataclass(frozen=True)
    class Options:
        server_lr: float = 1.0

        def __post_init__(self) -> None:
            if not self.server_lr > 0:
                raise ConfigError(f"config key 'strategy.server_lr' must be > 0, got {self.server_lr}")

    def client_weights(self, num_samples: Mapping[int, int]) -> dict[int, float]:
        return fedavg_weights(num_samples)

    def server_step(self, weights: np.ndarray, aggregate: np.ndarray, *,
                    out: np.ndarray | None = None) -> np.ndarray:
        step = aggregate if self.options.server_lr == 1.0 \
            else np.float32(self.options.server_lr) * aggregate
        return np.add(weights, step, out=out)
