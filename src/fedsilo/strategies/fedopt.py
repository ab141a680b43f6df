"""FedAdagrad, FedAdam and FedYogi: adaptive server optimizers (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 2).

The weighted mean update ``Δ`` is treated as a negative pseudo-gradient and fed to an
Adagrad / Adam / Yogi step on the server (see
:func:`fedsilo.aggregate.adaptive_server_step`).  Choices, following Algorithm 2:

* no bias correction (Flower's FedAdam adds one; the paper does not);
* ``m`` starts at zero and ``v`` at ``τ²`` (the paper requires ``v₋₁ ≥ τ²``; Flower
  starts at zero);
* defaults ``β1 = 0.9, β2 = 0.99`` as in the paper's experiments, except FedAdagrad whose
  ``β1`` defaults to 0 (Adagrad without momentum, as Flower's FedAdagrad); FedAdagrad has
  no ``β2``;
* ``τ = 1e-3`` (Flower uses 1e-9 for FedAdam and FedAdagrad, 1e-3 for FedYogi).  ``τ``
  sets how adaptive the step is: with ``v`` starting at ``τ²``, coordinates whose updates
  stay well below ``τ`` take steps proportional to ``Δ`` (about ``η (1 − β1) Δ / 2τ`` at
  first), larger ones steps of about ``η`` in the direction of ``m``.  A tiny ``τ`` makes
  every coordinate of the first rounds move by about ``η``, however small its update;
* ``server_lr η = 0.01``: the paper tunes ``η`` per task (with ``τ``) over powers of ten;
  tune it together with the participants' learning rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedsilo.aggregate import AdaptiveRule, adaptive_server_step
from fedsilo.strategies.base import (
    STRATEGIES,
    Strategy,
    check_option,
    check_server_lr,
    check_unit_interval,
)


def _check_tau(tau: float) -> None:
    check_option(tau > 0 and tau < float("inf"), "tau", f"must be a finite number > 0, got {tau}")


class FedOpt(Strategy):
    """Shared body: the subclasses differ in the ``v`` rule and their defaults."""

    rule: AdaptiveRule
    state_names = ("m", "v")

    @dataclasses.dataclass(frozen=True)
    class Options:
        server_lr: float = 0.01
        beta1: float = 0.9
        beta2: float = 0.99
        tau: float = 1e-3

        def __post_init__(self) -> None:
            check_server_lr(self.server_lr)
            check_unit_interval("beta1", self.beta1)
            check_unit_interval("beta2", self.beta2)
            _check_tau(self.tau)

    def initial_state(self, num_params: int) -> dict[str, np.ndarray]:
        tau = np.float32(self.options.tau)
        return {"m": np.zeros(num_params, dtype=np.float32),
                "v": np.full(num_params, tau * tau, dtype=np.float32)}

    def server_step(self, weights: np.ndarray, aggregate: np.ndarray, *,
                    out: np.ndarray | None = None, fraction: float = 1.0) -> np.ndarray:
        state = self._require_setup(weights)
        options: Any = self.options
        return adaptive_server_step(
            weights, aggregate, state["m"], state["v"], rule=self.rule, lr=options.server_lr,
            beta1=options.beta1, beta2=getattr(options, "beta2", 0.0), tau=options.tau, out=out)


@STRATEGIES.register("fedadam")
class FedAdam(FedOpt):
    name = "fedadam"
    rule = "adam"


@STRATEGIES.register("fedyogi")
class FedYogi(FedOpt):
    name = "fedyogi"
    rule = "yogi"


@STRATEGIES.register("fedadagrad")
class FedAdagrad(FedOpt):
    name = "fedadagrad"
    rule = "adagrad"

    @dataclasses.dataclass(frozen=True)
    class Options:
        server_lr: float = 0.01
        beta1: float = 0.0
        tau: float = 1e-3

        def __post_init__(self) -> None:
            check_server_lr(self.server_lr)
            check_unit_interval("beta1", self.beta1)
            _check_tau(self.tau)
