"""Reading a configuration: a YAML file (YAML 1.2, safe loading: ruamel.yaml) plus
``--set key=value`` overrides, validated by the schema; and its dump (the run directory's
``config.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import YAMLError

from fedsilo.config.root import Config
from fedsilo.config.schema import ExponentFloat, validate
from fedsilo.errors import ConfigError


class _Constructor(SafeConstructor):
    """ruamel.yaml's safe constructor, marking numbers written ``1e3`` (ExponentFloat)."""


def _construct_float(constructor: SafeConstructor, node: Any) -> Any:
    value = constructor.construct_yaml_float(node)
    if "." not in node.value and "e" in node.value.lower():
        value = ExponentFloat(value)
        value.text = node.value
    return value


_Constructor.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _parse(text: str) -> Any:
    """YAML 1.2 (``1e-3`` is a number, ``on`` and ``no`` are text), plain types only."""
    reader = YAML(typ="safe", pure=True)
    reader.Constructor = _Constructor
    return reader.load(text)


def load_config(path: str | Path | None, *, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML; None for defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): not "
                              f"a configuration") from None
        try:
            loaded = _parse(text)
        except YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_one_line(exc)}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} nests deeper than a configuration can "
                              f"(a YAML bomb or a generated file gone wrong)") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"config file {path} holds a value no configuration can: "
                              f"{exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, "
                              f"got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as exc:  # named with its file: a key is wrong in there (or in --set)
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(data: Mapping[str, Any]) -> Config:
    try:
        return validate(Config, data)
    except RecursionError:  # a self-referencing YAML alias (&a [*a])
        raise ConfigError("config holds a value that contains itself (a YAML alias of its "
                          "own node)") from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = _parse(raw) if raw.strip() else None
    except YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: "
                          f"{_one_line(exc)}") from None
    except RecursionError:
        raise ConfigError(f"override {item[:60]!r}...: value nests too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"override {item[:60]!r}...: {exc}") from None
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _one_line(exc: Exception) -> str:
    """A YAML error's message on one line (the parser spreads it over several, with a caret)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()
                    and line.strip() != "^")


def dump_config(config: Config) -> str:
    """The configuration as YAML that both YAML 1.1 and 1.2 readers read to the same values
    (PyYAML's safe dump quotes on/off/yes/no and writes floats with a dot)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
