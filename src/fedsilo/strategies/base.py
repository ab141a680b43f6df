"""The strategy interface: what the coordinator does with the summed, pre-weighted updates.

A strategy is a thin adapter over pure maths (numpy in, numpy out).  It never touches MPI:
the federation loop asks it for the weights of a round, hands it the aggregate that the
transport produced, and saves its state in the coordinator's checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from fedsilo.errors import ConfigError
from fedsilo.registry import Registry


class Strategy:
    """Base class.  Subclasses declare their options as a frozen dataclass ``Options``."""

    #: True when the aggregate is a weighted *sum* of updates (so a reduction or an
    #: encrypted sum can compute it); robust aggregators that need each update set False.
    linear: bool = True

    @dataclasses.dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, **options: Any) -> None:
        self.options = self.validate_options(options)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> Any:
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        for key, value in options.items():
            if key not in fields:
                known = ", ".join(sorted(fields)) or "(none)"
                raise ConfigError(
                    f"unknown config key 'strategy.{key}' for strategy {cls.name!r}; known: {known}"
                )
            expected = fields[key].type
            if expected in ("float", float) and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ConfigError(f"config key 'strategy.{key}' must be a number, got {value!r}")
        return cls.Options(**{k: float(v) if fields[k].type in ("float", float) else v
                              for k, v in options.items()})

    name: str = "base"

    def client_weights(self, num_samples: Mapping[int, int]) -> dict[int, float]:
        """Weight each participant's update is multiplied by before the sum."""
        raise NotImplementedError

    def server_step(self, weights: np.ndarray, aggregate: np.ndarray, *,
                    out: np.ndarray | None = None) -> np.ndarray:
        """New global weights from the current ones and the summed weighted updates.

        With ``out`` (which may be ``weights`` itself) the result is written there: the
        coordinator updates its 11M-float buffer in place instead of allocating each round.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Server state saved in the coordinator checkpoint (numpy arrays and scalars)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
