"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedProx changes only the participants: each minimises its loss plus the proximal term
``μ/2 ‖w − w_global‖²``, which keeps local models near the global one on heterogeneous
data.  The server step is FedAvg's, so this strategy is FedAvg plus :attr:`proximal_mu`,
which the participants read.  ``mu = 0`` is FedAvg.

The default ``mu = 0.01`` is from the middle of the paper's grid {0.001, 0.01, 0.1, 1}.
"""

from __future__ import annotations

import dataclasses
import math

from fedsilo.strategies.base import STRATEGIES, check_option, check_server_lr
from fedsilo.strategies.fedavg import FedAvg


@STRATEGIES.register("fedprox")
class FedProx(FedAvg):
    name = "fedprox"

    @dataclasses.dataclass(frozen=True)
    class Options:
        mu: float = 0.01
        server_lr: float = 1.0

        def __post_init__(self) -> None:
            check_option(math.isfinite(self.mu) and self.mu >= 0, "mu",
                         f"must be a finite number >= 0, got {self.mu}")
            check_server_lr(self.server_lr)

    @property
    def proximal_mu(self) -> float:
        return self.options.mu
