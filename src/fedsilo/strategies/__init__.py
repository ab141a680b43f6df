"""Server strategies, by name.  Aggregation maths lives in :mod:`fedsilo.aggregate`."""

from fedsilo.strategies.base import STRATEGIES, Strategy
from fedsilo.strategies import (  # noqa: F401  (each module registers its strategies)
    fedavg as _fedavg,
    fedavgm as _fedavgm,
    fedopt as _fedopt,
    fedprox as _fedprox,
    robust as _robust,
    scaffold as _scaffold,
)

__all__ = ["STRATEGIES", "Strategy", "build_strategy"]


def build_strategy(name: str, options: dict) -> Strategy:
    return STRATEGIES.get(name)(**options)
