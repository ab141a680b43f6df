"""Server strategies, by name.  Aggregation maths lives in :mod:`fedsilo.aggregate`."""

from fedsilo.strategies.base import STRATEGIES, Strategy
from fedsilo.strategies import fedavg as _fedavg  # noqa: F401  (registers)

__all__ = ["STRATEGIES", "Strategy", "build_strategy"]


def build_strategy(name: str, options: dict) -> Strategy:
    return STRATEGIES.get(name)(**options)
