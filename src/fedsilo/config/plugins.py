"""The registries the configuration looks plug-in names up in, filled by the plug-ins.

The configuration sits below the plug-ins: it checks ``strategy.name`` and its options and
``model.name``, but never imports a strategy or a model module.  Each registry names the
package whose import registers the built-ins (``fedsilo.strategies``, ``fedsilo.models``),
imported on the first look-up, as entry points are; a plug-in defined elsewhere (a test
file) registers itself on import.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from fedsilo.registry import Registry


class StrategySpec(Protocol):
    """What the configuration needs of a strategy class (``fedsilo.strategies.Strategy``):
    its options, checked, and the properties the cross-section rules read."""

    name: str
    #: the aggregate is a weighted sum of updates (a reduction or an encrypted sum computes it)
    linear: bool
    #: participants upload control-variate changes beside their update (SCAFFOLD)
    control_variates: bool

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> Any: ...


#: server strategies, by name (``fedsilo/strategies/``)
STRATEGIES: Registry[Any] = Registry("strategy", builtins="fedsilo.strategies")
#: the model zoo, by name (``fedsilo/models/``); ``tv:ARCH`` names are checked apart
MODELS: Registry[Callable[..., Any]] = Registry("model", builtins="fedsilo.models")
