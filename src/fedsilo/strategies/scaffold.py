"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), server side, with option II control variates.

The server keeps a control variate ``c`` (zero at first) and sends it to the participants
every round (:attr:`Scaffold.server_control`).  Participant ``k`` keeps its own ``c_k``
(zero at first), trains with the corrected gradient ``g − c_k + c`` for ``K`` local steps
of learning rate ``η_l``, then (option II)::

    c_k⁺ = c_k − c + (w − w_k) / (K η_l)
    uploads [Δw_k, Δc_k] = [w_k − w, c_k⁺ − c_k]        (2N floats), and sets c_k ← c_k⁺

The server receives the weighted mean of those uploads and steps::

    w ← w + η_g Σ p_k Δw_k
    c ← c + (|S| / N_sites) Σ p_k Δc_k

The paper averages uniformly (``p_k = 1/|S|``, so ``c`` tracks the plain mean of the
``c_k``); here ``p_k`` are the federation's sample weights, so with every site taking part
``c`` tracks ``Σ p_k c_k``, the control variate of the sample-weighted objective that
FedAvg minimises.  ``|S| / N_sites`` is the ``fraction`` argument: sites that sat out a
round keep their ``c_k``, so their share of ``c`` does not move.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedsilo.aggregate import add_scaled
from fedsilo.strategies.base import STRATEGIES, Strategy, check_server_lr


@STRATEGIES.register("scaffold")
class Scaffold(Strategy):
    name = "scaffold"
    control_variates = True
    state_names = ("control",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        server_lr: float = 1.0

        def __post_init__(self) -> None:
            check_server_lr(self.server_lr)

    def initial_state(self, num_params: int) -> dict[str, np.ndarray]:
        return {"control": np.zeros(num_params, dtype=np.float32)}

    @property
    def server_control(self) -> np.ndarray:
        """The global ``c`` as a read-only view (it changes at the next :meth:`server_step`)."""
        view = self._require_setup()["control"].view()
        view.flags.writeable = False
        return view

    def server_step(self, weights: np.ndarray, aggregate: np.ndarray, *,
                    out: np.ndarray | None = None, fraction: float = 1.0) -> np.ndarray:
        control = self._require_setup(weights)["control"]
        size = control.size
        if aggregate.shape != (2 * size,):
            raise ValueError(f"scaffold expects the aggregate [Σ p_k Δw_k, Σ p_k Δc_k] of "
                             f"2 × {size} floats, got shape {aggregate.shape}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction of contributing sites must be in (0, 1], got {fraction}")
        out = add_scaled(weights, aggregate[:size], scale=self.options.server_lr, out=out)
        add_scaled(control, aggregate[size:], scale=fraction, out=control)
        return out
