"""Name registries for the pluggable parts (models, strategies, partitioners, codecs...).

>>> r = Registry("colour")
>>> @r.register("red")
... def red():
...     return "#f00"
>>> r.get("red")()
'#f00'
>>> r.get("blue")
Traceback (most recent call last):
...
fedsilo.errors.ConfigError: unknown colour 'blue'; known: red
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from fedsilo.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names fail with the list of known ones.

    ``builtins`` names the package whose import registers the built-in entries.  A registry
    that a lower layer looks names up in (the configuration checks a strategy's options and
    a model's name) is defined there and filled by the plug-ins above it, which register
    themselves on import, as entry points do: the package is imported on the first look-up,
    so the lower layer never names (imports) a plug-in module.
    """

    def __init__(self, kind: str, *, builtins: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._builtins = builtins

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            package, self._builtins = self._builtins, None
            importlib.import_module(package)

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
