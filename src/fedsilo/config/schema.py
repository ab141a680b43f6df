"""The schema's building blocks: sections as pydantic dataclasses, leaf types, and one
translation of pydantic's errors into a :class:`~fedsilo.errors.ConfigError` that names the
key's dotted path and the cause.

A section is a frozen pydantic dataclass with ``SECTION_CONFIG``: unknown keys are refused, each
field's type and range are declared on it (``setting(default, ge=1)``), and the message of a
bad value is derived from that declaration.  Leaf types are strict (a string is no number,
1 is no boolean) with exceptions kept from the first release: an integral float is an
integer (``3.0`` is ``3``; ``1e3`` is not), ``1e-3`` given as a string (as Python callers
and YAML 1.1 readers give it) is a number, and a boolean key takes yes/no/on/off.

>>> from pydantic.dataclasses import dataclass
>>> @dataclass(frozen=True, config=SECTION_CONFIG)
... class Demo:
...     epochs: Int = setting(1, ge=1)
...     lr: Float = setting(0.1, gt=0, le=1)
>>> validate(Demo, {"epochs": 3.0, "lr": "1e-3"})
Demo(epochs=3, lr=0.001)
>>> validate(Demo, {"lr": 2}, prefix="train.")
Traceback (most recent call last):
...
fedsilo.errors.ConfigError: config key 'train.lr' must be in (0, 1], got 2
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from typing import Annotated, Any, Callable, Literal, TypeVar

import annotated_types
import pydantic
import typing_extensions
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter
from pydantic_core import PydanticCustomError

from fedsilo.errors import ConfigError

T = TypeVar("T")

#: every section: unknown keys refused, values validated on construction and on
#: ``dataclasses.replace``
SECTION_CONFIG = ConfigDict(extra="forbid")

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
#: the words YAML 1.1 read as booleans; YAML 1.2 reads them as text.  Boolean keys still
#: take them, so a configuration written for the first release loads to the same values
_BOOL_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}


class ExponentFloat(float):
    """A number YAML read from exponent notation without a point (``1e3``): a number for a
    float key, but no integer (the first release, reading YAML 1.1, saw the text "1e3")."""

    text: str


def _integral(value: Any) -> Any:
    if isinstance(value, ExponentFloat):
        return value.text
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _scientific(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return float(value) if isinstance(value, ExponentFloat) else value


def _bool_word(value: Any) -> Any:
    if isinstance(value, str):
        for flag, words in _BOOL_WORDS.items():
            if value.lower() in words:
                return flag
    return value


Int = Annotated[int, BeforeValidator(_integral), Strict()]
Float = Annotated[float, BeforeValidator(_scientific), Strict()]
Bool = Annotated[bool, BeforeValidator(_bool_word), Strict()]
Str = Annotated[str, Strict()]


def bool_words(*choices: str) -> BeforeValidator:
    """For a Literal of words such as on/off: a YAML boolean becomes its word (``true`` ->
    ``"on"`` where the choices say on)."""

    def word(value: Any) -> Any:
        if isinstance(value, bool):
            return next((c for c in choices if c in _BOOL_WORDS[value]), value)
        return value

    return BeforeValidator(word)


def setting(default: Any = dataclasses.MISSING, *, why: str | None = None,
            default_factory: Callable[[], Any] | None = None, **bounds: Any) -> Any:
    """A field with its default, its range (``ge``, ``gt``, ``le``, ``lt``) and what a user
    should know when the value is out of it (``why``)."""
    extra: Any = {"why": why} if why else None
    if default_factory is not None:
        return Field(default_factory=default_factory, json_schema_extra=extra, **bounds)
    return Field(default, json_schema_extra=extra, **bounds)


def cause(message: str) -> PydanticCustomError:
    """An error a validator raises: ``message`` follows the key's name."""
    return PydanticCustomError("config", message)


def check(ok: bool, key: str, what: str) -> None:
    """A cross-field rule: a ConfigError naming ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def validate(cls: type[T], data: Any, *, prefix: str = "") -> T:
    """``data`` (plain YAML data) as ``cls``, or the ConfigError of its first bad key."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"config key '{where}' must be a mapping, got {describe(data)}")
    adapter = _ADAPTERS.get(cls) or _ADAPTERS.setdefault(cls, TypeAdapter(cls))
    try:
        return typing.cast(T, adapter.validate_python(dict(data)))
    except pydantic.ValidationError as exc:
        raise config_error(exc, cls, prefix) from None


def config_error(exc: pydantic.ValidationError, root: Any, prefix: str = "") -> ConfigError:
    """The first of pydantic's errors, as one line naming the key (``prefix`` + its path)."""
    error = exc.errors(include_url=False)[0]
    keys, hint, info, parent = _walk(root, error["loc"])
    keys = [_shown(k) for k in keys]
    key = prefix + ".".join(keys) if keys else prefix.rstrip(".") or "config"
    kind, value = error["type"], error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        where = prefix + ".".join(keys[:-1]) if len(keys) > 1 else prefix.rstrip(".") or "config"
        return ConfigError(f"unknown config key '{key}'; known keys of '{where}': "
                           f"{', '.join(sorted(_keys(parent)))}")
    return ConfigError(f"config key '{key}' {_what(kind, error, value, hint, info)}")


def _shown(key: Any) -> str:
    """A key as the message shows it: escaped where it holds a line break or another
    unprintable character, so that the error stays on one line.

    >>> _shown("train.lr"), _shown("a\\nb")
    ('train.lr', 'a\\\\nb')
    """
    text = str(key)
    return text if text.isprintable() else repr(text)[1:-1]


def _what(kind: str, error: Any, value: Any, hint: Any, info: Any) -> str:
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer, got {describe(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, got {describe(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {describe(value)}"
    if kind == "string_type":
        return f"must be a string, got {describe(value)}"
    if kind == "literal_error":
        choices = _literals(hint) or [error.get("ctx", {}).get("expected", "?")]
        return f"must be one of {', '.join(map(str, choices))}; got {value!r}"
    if kind in ("dataclass_type", "dict_type", "mapping_type", "model_type", "typed_dict_type"):
        return f"must be a mapping, got {describe(value)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        why = ((info.json_schema_extra or {}).get("why") if info is not None else None)
        return f"must be {_range(info)}, got {_number(value)}" + (f" ({why})" if why else "")
    if kind == "config":
        return str(error["msg"])
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return f"is invalid: {error['msg']}"


def _range(info: Any) -> str:
    bounds = {type(m).__name__: m for m in getattr(info, "metadata", ())
              if isinstance(m, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le,
                                annotated_types.Lt))}
    lo = bounds.get("Ge") or bounds.get("Gt")
    hi = bounds.get("Le") or bounds.get("Lt")
    if lo is not None and hi is not None:
        low = getattr(lo, "ge", None)
        high = getattr(hi, "le", None)
        return ("in " + ("[" if low is not None else "(")
                + _number(low if low is not None else getattr(lo, "gt")) + ", "
                + _number(high if high is not None else getattr(hi, "lt"))
                + ("]" if high is not None else ")"))
    for name, sign in (("Ge", ">="), ("Gt", ">"), ("Le", "<="), ("Lt", "<")):
        if name in bounds:
            return f"{sign} {_number(getattr(bounds[name], name.lower()))}"
    return "in range"


def _number(value: Any) -> str:
    """2^63 rather than 9223372036854775808, 1e7 rather than 10000000.0."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 2**20 \
            and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    if isinstance(value, float) and math.isfinite(value) and value >= 1e5 and value.is_integer():
        exponent = round(math.log10(value))
        if 10.0 ** exponent == value:
            return f"1e{exponent}"
    return f"{value:g}" if isinstance(value, float) else repr(value)


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _walk(root: Any, loc: tuple[Any, ...]) -> tuple[list[str], Any, Any, Any]:
    """The clean dotted path of ``loc`` (union tags dropped), and at its end the type, the
    pydantic field info (bounds, why) and the section that holds the key."""
    keys: list[str] = []
    hint, info, parent = root, None, root
    for part in loc:
        if part == "[key]":  # the error is in the mapping's key, named already
            continue
        hint = _unwrap(hint)
        if dataclasses.is_dataclass(hint) or _is_typed_dict(hint):
            parent = hint
            keys.append(str(part))
            fields = getattr(hint, "__pydantic_fields__", None)
            info = fields.get(part) if fields else None
            hint = typing.get_type_hints(hint, include_extras=True).get(part, Any)
        elif typing.get_origin(hint) in (dict, collections.abc.Mapping):
            keys.append(str(part))
            hint = typing.get_args(hint)[1] if typing.get_args(hint) else Any
        elif _is_union(hint):
            members = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = next((m for m in members if _tag_matches(m, part)), members[0])
        else:
            keys.append(str(part))
    return keys, _unwrap(hint), info, parent


def _unwrap(hint: Any) -> Any:
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_typed_dict(hint: Any) -> bool:
    return isinstance(hint, type) and typing_extensions.is_typeddict(hint)


def _tag_matches(member: Any, tag: Any) -> bool:
    member = _unwrap(member)
    if typing.get_origin(member) is Literal:
        return str(tag).startswith("literal[")
    return getattr(member, "__name__", None) == tag or str(tag).endswith(
        f"[{getattr(member, '__name__', '')}]")


def _literals(hint: Any) -> list[Any]:
    hint = _unwrap(hint)
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    if _is_union(hint):
        return [c for a in typing.get_args(hint) for c in _literals(a)]
    return []


def _keys(parent: Any) -> list[str]:
    if dataclasses.is_dataclass(parent):
        return [f.name for f in dataclasses.fields(parent)]
    if _is_typed_dict(parent):
        return list(typing.get_type_hints(parent))
    return []


def coerce_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` as type ``hint`` (``int``, ``float``, ``bool``, ``str``, a Literal...), by
    the schema's rules, or a ConfigError naming ``key``.

    >>> coerce_value(float, "1e-3", "strategy.mu"), coerce_value(int, 3.0, "rounds")
    (0.001, 3)
    >>> coerce_value(int, 2.5, "rounds")
    Traceback (most recent call last):
    ...
    fedsilo.errors.ConfigError: config key 'rounds' must be an integer, got float 2.5
    """
    strict = leaf_type(hint)
    adapter = _ADAPTERS.get(("leaf", strict)) or _ADAPTERS.setdefault(("leaf", strict),
                                                                     TypeAdapter(strict))
    try:
        return adapter.validate_python(value)
    except pydantic.ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        *_, last = (None, *error["loc"])
        member = hint
        if _is_union(hint) and last is not None:
            members = [a for a in typing.get_args(hint) if a is not type(None)]
            member = next((m for m in members if _tag_matches(m, last)), members[0])
        raise ConfigError(f"config key '{key}' "
                          f"{_what(error['type'], error, value, member, None)}") from None


_LEAVES: dict[Any, Any] = {int: Int, float: Float, bool: Bool, str: Str}


def leaf_type(hint: Any) -> Any:
    """``hint`` with each plain ``int``/``float``/``bool``/``str`` made the schema's strict
    leaf type (for the plain dataclasses strategies declare their options with)."""
    if hint in _LEAVES:
        return _LEAVES[hint]
    if _is_union(hint):
        return typing.Union[tuple(leaf_type(a) for a in typing.get_args(hint))]
    return hint
