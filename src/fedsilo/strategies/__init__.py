"""Server strategies, by name.  Aggregation maths lives in :mod:`fedsilo.aggregate`."""

# each module registers its strategies
from fedsilo.strategies import fedavg as _fedavg  # noqa: F401
from fedsilo.strategies import fedavgm as _fedavgm  # noqa: F401
from fedsilo.strategies import fedopt as _fedopt  # noqa: F401
from fedsilo.strategies import fedprox as _fedprox  # noqa: F401
from fedsilo.strategies import robust as _robust  # noqa: F401
from fedsilo.strategies import scaffold as _scaffold  # noqa: F401
from fedsilo.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Strategy", "build_strategy"]


def build_strategy(name: str, options: dict) -> Strategy:
    return STRATEGIES.get(name)(**options)
