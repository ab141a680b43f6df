"""The strategy interface: what the coordinator does with the participants' updates.

A strategy is a thin adapter over pure maths (numpy in, numpy out, in
:mod:`fedsilo.aggregate`).  It never touches MPI.  Each round the coordinator

1. asks :meth:`Strategy.client_weights` for the weights ``p_k`` (summing to 1);
2. obtains the aggregate update ``Σ_k p_k Δ_k`` with ``Δ_k = w_k − w``: a linear strategy
   gets it from a plain sum of pre-weighted updates (an MPI reduction or an encrypted sum);
   a non-linear one (``linear = False``) gathers the ``K`` raw updates and calls
   :meth:`Strategy.combine`;
3. calls :meth:`Strategy.server_step` for the new global weights.

Strategies that keep server state (momentum, moments, control variates) allocate it in
:meth:`Strategy.setup`, which the coordinator calls once with the model size before the
first round and before :meth:`Strategy.load_state_dict` on resume.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, Sequence

import numpy as np

from fedsilo.aggregate import fedavg_weights, weighted_mean
from fedsilo.config.plugins import STRATEGIES as _STRATEGIES
from fedsilo.config.schema import coerce_value
from fedsilo.errors import CheckpointError, ConfigError
from fedsilo.registry import Registry


def check_option(ok: bool, key: str, what: str) -> None:
    """Raise the :class:`ConfigError` an ``Options.__post_init__`` reports a bad value with."""
    if not ok:
        raise ConfigError(f"config key 'strategy.{key}' {what}")


def check_server_lr(server_lr: float) -> None:
    check_option(math.isfinite(server_lr) and server_lr > 0, "server_lr",
                 f"must be a finite number > 0, got {server_lr}")


def check_unit_interval(key: str, value: float) -> None:
    """Decay rates (momentum, β1, β2) must lie in [0, 1)."""
    check_option(0 <= value < 1, key, f"must be in [0, 1), got {value}")


class Strategy:
    """Base class.  Subclasses declare their options as a frozen dataclass ``Options``."""

    name: str = "base"

    #: True when the aggregate is a weighted *sum* of updates (so a reduction or an
    #: encrypted sum can compute it); robust aggregators that need each update set False.
    linear: bool = True

    #: True when participants upload ``[Δw, Δc]`` (2N floats) instead of ``Δw``, and need
    #: :attr:`server_control` each round (SCAFFOLD).
    control_variates: bool = False

    #: names of the float32 buffers :meth:`initial_state` allocates (empty: stateless)
    state_names: tuple[str, ...] = ()

    @dataclasses.dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, **options: Any) -> None:
        self.options = self.validate_options(options)
        #: model size given to :meth:`setup`; None until then
        self.num_params: int | None = None
        self._state: dict[str, np.ndarray] = {}

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> Any:
        """The options as ``cls.Options``: unknown keys and wrong types fail by key name.

        Values go through the config schema's leaf types (:func:`fedsilo.config.coerce_value`), so
        float fields accept ints and ``"1e-3"``, int fields accept integral floats.
        """
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        values = {}
        for key, value in options.items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "(none)"
                raise ConfigError(
                    f"unknown config key 'strategy.{key}' for strategy {cls.name!r}; known: {known}"
                )
            values[key] = coerce_value(hints[key], value, f"strategy.{key}")
        return cls.Options(**values)

    @property
    def proximal_mu(self) -> float:
        """FedProx μ: > 0 means participants add ``μ/2 ‖w − w_global‖²`` to their loss."""
        return 0.0

    @property
    def server_control(self) -> np.ndarray | None:
        """SCAFFOLD's global control variate ``c`` (N,), which participants need each round."""
        return None

    def client_weights(self, num_samples: Mapping[int, int]) -> dict[int, float]:
        """Weight ``p_k`` of each participant's update: ``n_k / Σ n`` (they sum to 1)."""
        return fedavg_weights(num_samples)

    def setup(self, num_params: int) -> None:
        """Allocate the server state for a model of ``num_params`` floats (resets it)."""
        if isinstance(num_params, bool) or not isinstance(num_params, (int, np.integer)) \
                or num_params < 1:
            raise ValueError(f"num_params must be a positive integer, got {num_params!r}")
        self.num_params = int(num_params)
        self._state = self.initial_state(self.num_params)

    def initial_state(self, num_params: int) -> dict[str, np.ndarray]:
        """The state before round 1, one float32 array per name in :attr:`state_names`."""
        return {}

    def combine(self, updates: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        """The aggregate update from ``K`` raw updates (rows of ``updates``) and their ``p_k``.

        Linear strategies never need it (the transport sums); this default, the weighted
        mean ``Σ p_k Δ_k / Σ p_k``, is what that sum amounts to.
        """
        if len(weights) != len(updates):
            raise ValueError(f"need one weight per update, got {len(weights)} and {len(updates)}")
        return weighted_mean(updates, weights)

    def server_step(self, weights: np.ndarray, aggregate: np.ndarray, *,
                    out: np.ndarray | None = None, fraction: float = 1.0) -> np.ndarray:
        """New global weights from the current ones and the aggregate update.

        ``aggregate`` is ``Σ_k p_k Δ_k`` over the participants that contributed, with
        ``Σ p_k = 1`` (for SCAFFOLD it is ``2N`` long: ``[Σ p_k Δw_k, Σ p_k Δc_k]``).
        ``fraction`` is the share of the federation's sites that contributed.  With ``out``
        (which may be ``weights`` itself) the result is written there: the coordinator
        updates its 11M-float buffer in place instead of allocating each round.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Server state saved in the coordinator checkpoint (copies of numpy arrays)."""
        if self.state_names:
            self._require_setup()
        return {name: array.copy() for name, array in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly; :meth:`setup` must have been called."""
        if set(state) != set(self.state_names):
            raise CheckpointError(
                f"checkpoint state of strategy {self.name!r} has keys {sorted(state)}, "
                f"expected {sorted(self.state_names)}")
        if not self.state_names:
            return
        self._require_setup()
        for name in self.state_names:
            value, target = np.asarray(state[name]), self._state[name]
            if value.shape != target.shape or value.dtype != target.dtype:
                raise CheckpointError(
                    f"checkpoint state {name!r} of strategy {self.name!r} is {value.dtype} "
                    f"{value.shape}, expected {target.dtype} {target.shape}")
            np.copyto(target, value)

    def _require_setup(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if self.num_params is None:
            raise RuntimeError(f"strategy {self.name!r} keeps server state: call "
                               f"setup(num_params) before the first round")
        if weights is not None and weights.shape != (self.num_params,):
            raise ValueError(f"strategy {self.name!r} was set up for {self.num_params} "
                             f"parameters, got weights of shape {weights.shape}")
        return self._state


#: defined with the configuration, which checks a strategy's options without importing this
#: package
STRATEGIES: Registry[type[Strategy]] = _STRATEGIES
