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

from typing import Callable, Generic, Iterator, TypeVar

from fedsilo.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names fail with the list of known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
